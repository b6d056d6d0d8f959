"""Built-in models that work offline: ``model: builtin:<name>``.

A built-in model is a small, randomly initialised mlx-lm model with a
byte-level tokenizer. It is built deterministically (fixed seed) on first use
and written in mlx-lm's on-disk format (``config.json``, ``model.safetensors``,
``tokenizer.json``, ``tokenizer_config.json``) to a cache folder, so it is
loaded by ``mlx_lm.load`` like any downloaded model, and ``mlx_lm.generate``
and ``mlx_lm.fuse`` accept it together with the adapters trained on it.

The cache lives in ``$MLX_FLASH_CACHE/builtin/<name>`` (default
``~/.cache/mlx_flash``).
"""

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Dict

import mlx.core as mx
from mlx.utils import tree_flatten

PREFIX = "builtin:"

#: Special tokens first, then one token per byte: every string encodes.
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")
BYTE_VOCAB_SIZE = len(SPECIAL_TOKENS) + 256

#: Model configurations in Hugging Face / mlx-lm ``config.json`` form.
MODELS: Dict[str, dict] = {
    # A 2-layer llama with grouped-query attention (4 query heads share 2 KV
    # heads), small enough that a LoRA step takes milliseconds on a CPU.
    "tiny-llama": {
        "model_type": "llama",
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "intermediate_size": 176,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "head_dim": 16,
        "rms_norm_eps": 1e-5,
        "vocab_size": BYTE_VOCAB_SIZE,
        "max_position_embeddings": 1024,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
    },
}

#: Changing how a built-in model is made changes this, so stale caches rebuild.
BUILD_VERSION = 1
SEED = 0


def cache_root() -> Path:
    return Path(os.environ.get("MLX_FLASH_CACHE", "~/.cache/mlx_flash")).expanduser()


def is_builtin(model: str) -> bool:
    return model.startswith(PREFIX)


def byte_tokenizer():
    """A ``PreTrainedTokenizerFast`` that maps each UTF-8 byte to one token.

    Ids 0, 1, 2 are ``<pad>``, ``<s>``, ``</s>``; the 256 byte tokens follow.
    Nothing is added around the encoded text (mlx-lm's datasets append the
    end-of-sequence token themselves).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # ByteLevel's alphabet holds one printable stand-in per byte value.
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for char in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[char] = len(vocab)
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        model_max_length=1 << 20,
    )


def model_classes(config: dict):
    """The mlx-lm ``Model`` and ``ModelArgs`` classes of a ``config.json`` dictionary.

    An architecture is the module ``mlx_lm.models.<model_type>``, which
    defines both; ``MODEL_REMAPPING`` names the module of a type that shares
    another's (mistral is llama). mlx-lm's own lookup is private.
    """
    import importlib

    from mlx_lm.utils import MODEL_REMAPPING

    model_type = MODEL_REMAPPING.get(config["model_type"], config["model_type"])
    try:
        module = importlib.import_module(f"mlx_lm.models.{model_type}")
    except ImportError:
        raise ValueError(f"model type {config['model_type']!r} is not an mlx-lm architecture") from None
    return module.Model, module.ModelArgs


def write_model(path: Path, config: dict, seed: int = SEED) -> Path:
    """Write a randomly initialised mlx-lm model and the byte tokenizer to ``path``.

    ``config`` is a ``config.json`` dictionary (``model_type`` picks the
    mlx-lm architecture); its ``vocab_size`` must be at least
    ``BYTE_VOCAB_SIZE``. The weights depend only on ``config`` and ``seed``.
    """
    if config["vocab_size"] < BYTE_VOCAB_SIZE:
        raise ValueError(f"vocab_size must be at least {BYTE_VOCAB_SIZE} for the byte tokenizer")
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    model_class, args_class = model_classes(config)
    mx.random.seed(seed)
    model = model_class(args_class.from_dict(config))
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(path / "model.safetensors"), weights, metadata={"format": "mlx"})
    config = dict(config, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    (path / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    byte_tokenizer().save_pretrained(str(path))
    return path


def _build_stamp(name: str) -> dict:
    return {"name": name, "version": BUILD_VERSION, "seed": SEED}


def cached(model: str) -> bool:
    """Whether built-in ``model`` is already built in the cache (nothing to write)."""
    name = model[len(PREFIX) :]
    stamp = cache_root() / "builtin" / name / "mlx_flash_build.json"
    try:
        return json.loads(stamp.read_text()) == _build_stamp(name)
    except (OSError, ValueError):
        return False


def ensure(model: str) -> Path:
    """The cache folder of built-in ``model`` (``"builtin:<name>"``), built if missing."""
    name = model[len(PREFIX) :]
    if name not in MODELS:
        raise KeyError(name)
    final = cache_root() / "builtin" / name
    stamp = final / "mlx_flash_build.json"
    expected = _build_stamp(name)
    if cached(model):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    # Build beside the final folder and rename it into place, so a reader
    # never sees a half-written model and two builders do not collide.
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=final.parent))
    try:
        write_model(tmp, MODELS[name])
        (tmp / "mlx_flash_build.json").write_text(json.dumps(expected) + "\n")
        if final.exists():
            shutil.rmtree(final, ignore_errors=True)
        try:
            os.replace(tmp, final)
        except OSError:
            # Another process put a complete copy there first.
            if not stamp.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
