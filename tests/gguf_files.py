"""Small GGUF files for the tests, written with llama.cpp's own ``gguf`` package.

A tiny mlx-lm model (random weights, Hugging Face row order) is written the
way llama.cpp's converter writes it: tensor names translated and, for llama,
the Q and K rows permuted by mlx-lm's GGUF exporter's ``permute_weights``;
each tensor in a chosen ggml type, quantized by ``gguf.quants``. The
tokenizer is byte-level BPE over the 256 byte symbols plus two control
tokens, with no merges, and a ChatML template.
"""

from pathlib import Path
from typing import Dict, Optional

import mlx.core as mx
import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter, quants
from mlx.utils import tree_flatten
from mlx_lm.gguf import permute_weights, translate_weight_names
from tokenizers import pre_tokenizers

from mlx_flash.finetune.builtin import model_classes

SPECIALS = ["<|im_start|>", "<|im_end|>"]
TOKENS = SPECIALS + sorted(pre_tokenizers.ByteLevel.alphabet())
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

TINY = {
    "llama": {
        "model_type": "llama",
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "intermediate_size": 96,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "rms_norm_eps": 1e-5,
        "vocab_size": len(TOKENS),
        "max_position_embeddings": 256,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
    },
    "qwen2": {
        "model_type": "qwen2",
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "intermediate_size": 96,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-6,
        "vocab_size": len(TOKENS),
        "max_position_embeddings": 256,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": False,
    },
}


def tiny_model(config: dict, seed: int = 0):
    """A randomly initialised mlx-lm model of ``config`` (float32)."""
    model_class, args_class = model_classes(config)
    mx.random.seed(seed)
    model = model_class(args_class.from_dict(config))
    # Norm weights start at one; vary them so that a misplaced norm shows.
    for name, param in tree_flatten(model.parameters()):
        if "norm" in name:
            model.load_weights([(name, param + 0.1 * mx.random.normal(param.shape))], strict=False)
    mx.eval(model.parameters())
    return model


def gguf_tensors(model, config: dict, permute: bool) -> Dict[str, np.ndarray]:
    """The model's weights under GGUF names, Q/K rows permuted as llama.cpp does for llama."""
    out = {}
    for name, w in tree_flatten(model.parameters()):
        if permute and "self_attn.q_proj." in name:
            w = permute_weights(w, config["num_attention_heads"], config["num_attention_heads"])
        if permute and "self_attn.k_proj." in name:
            w = permute_weights(w, config["num_attention_heads"], config["num_key_value_heads"])
        out[translate_weight_names(name)] = np.array(w.astype(mx.float32))
    return out


def write(
    path: Path,
    arch: str,
    config: dict,
    tensors: Dict[str, np.ndarray],
    types: Optional[Dict[str, GGMLQuantizationType]] = None,
    tokenizer_model: str = "gpt2",
) -> Path:
    """Write a GGUF with ``tensors`` (each in ``types[name]``, F32 by default;
    a ``uint8`` array is taken as that type's bytes, already packed)."""
    types = types or {}
    w = GGUFWriter(str(path), arch)
    w.add_uint32(f"{arch}.block_count", config["num_hidden_layers"])
    w.add_uint32(f"{arch}.context_length", config["max_position_embeddings"])
    w.add_uint32(f"{arch}.embedding_length", config["hidden_size"])
    w.add_uint32(f"{arch}.feed_forward_length", config["intermediate_size"])
    w.add_uint32(f"{arch}.attention.head_count", config["num_attention_heads"])
    w.add_uint32(f"{arch}.attention.head_count_kv", config["num_key_value_heads"])
    w.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", config["rms_norm_eps"])
    w.add_float32(f"{arch}.rope.freq_base", config["rope_theta"])
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    w.add_uint32(f"{arch}.rope.dimension_count", head_dim)
    if "head_dim" in config:
        w.add_uint32(f"{arch}.attention.key_length", head_dim)
    w.add_tokenizer_model(tokenizer_model)
    w.add_tokenizer_pre("default")
    w.add_token_list(TOKENS)
    w.add_token_types([3 if t in SPECIALS else 1 for t in TOKENS])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    w.add_chat_template(CHAT_TEMPLATE)
    for name, array in tensors.items():
        kind = types.get(name, GGMLQuantizationType.F32)
        if array.dtype == np.uint8:
            w.add_tensor(name, array, raw_dtype=kind)
        elif kind == GGMLQuantizationType.F32:
            w.add_tensor(name, array.astype(np.float32))
        elif kind == GGMLQuantizationType.F16:
            w.add_tensor(name, array.astype(np.float16))
        else:
            w.add_tensor(name, quants.quantize(array.astype(np.float32), kind), raw_dtype=kind)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def round_trip(array: np.ndarray, kind: GGMLQuantizationType) -> np.ndarray:
    """``array`` as a file of type ``kind`` holds it: quantized and dequantized by ``gguf``."""
    if kind in (GGMLQuantizationType.F32,):
        return array.astype(np.float32)
    if kind == GGMLQuantizationType.F16:
        return array.astype(np.float16).astype(np.float32)
    return quants.dequantize(quants.quantize(array.astype(np.float32), kind), kind).astype(np.float32)
