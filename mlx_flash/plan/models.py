"""What the planner needs of a model, read without loading a weight.

``resolve(model)`` accepts:

- a known name whose ``config.json`` ships with the package
  (``mlx_flash/configs/<name>.json``: ``qwen2.5-1.5b``, ``qwen3-8b``, ...);
- ``builtin:<name>`` (mlx_flash.finetune.builtin);
- an mlx-lm model folder or a ``config.json`` file (the weights' size is
  read from the ``.safetensors`` files beside it when they are there);
- a GGUF file (``gguf:PATH`` or a path ending ``.gguf``; its header only);
- a recipe YAML (its ``model``; the recipe's own keys are read by the CLI).

and returns a ``Geometry``: the shapes of one transformer block, the
vocabulary, and the bytes of the weights as they would sit in memory
(quantized weights with their scales and biases).
"""

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import List, Optional

CONFIGS = Path(__file__).resolve().parent.parent / "configs"

#: Bytes per element of an activation dtype.
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


class PlanError(ValueError):
    """A model, size or option the planner cannot use; ``str()`` is one line."""


@dataclass(frozen=True)
class Geometry:
    """One model's shapes. For a mixture of experts ``intermediate`` is one
    expert's; ``experts_per_token`` of them run per token."""

    name: str
    model_type: str
    hidden: int
    intermediate: int
    layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    dtype: str
    weights_bytes: int
    bits: Optional[int] = None
    group_size: Optional[int] = None
    experts: int = 0
    experts_per_token: int = 0
    window: Optional[int] = None
    window_layers: int = 0
    qkv_bias: bool = False

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def mlp_width(self) -> int:
        """The MLP's intermediate width per token (experts that run, summed)."""
        return self.intermediate * (self.experts_per_token or 1)

    @property
    def qkv_width(self) -> int:
        """Query, key and value features per token."""
        return (self.n_heads + 2 * self.n_kv_heads) * self.head_dim

    def linears(self) -> List[tuple]:
        """``(in, out, copies)`` of every linear layer of one block: what
        mlx-lm's ``linear_to_lora_layers`` adapts (experts count once per
        expert)."""
        h, d = self.hidden, self.head_dim
        out = [(h, self.n_heads * d, 1), (h, self.n_kv_heads * d, 1), (h, self.n_kv_heads * d, 1), (self.n_heads * d, h, 1)]
        copies = self.experts or 1
        out += [(h, self.intermediate, copies), (h, self.intermediate, copies), (self.intermediate, h, copies)]
        return out


def known_models() -> List[str]:
    return sorted(p.stem for p in CONFIGS.glob("*.json"))


def shipped_config(name: str) -> dict:
    path = CONFIGS / f"{name}.json"
    if not path.is_file():
        raise PlanError(f"unknown model '{name}' (known: {', '.join(known_models())}; or a folder, config.json, GGUF, builtin: or recipe)")
    return json.loads(path.read_text())


def _text_config(config: dict) -> dict:
    # Multimodal configs (gemma3, mistral3, ...) keep the language model's keys in text_config.
    inner = config.get("text_config")
    return {**config, **inner} if isinstance(inner, dict) else config


def _int(config: dict, key: str, source: str, default=None) -> int:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise PlanError(f"{source}: config key '{key}' must be a positive integer, got {value!r}")
    return value


def _quantization(config: dict):
    q = config.get("quantization") or config.get("quantization_config")
    if not isinstance(q, dict) or "bits" not in q:
        return None, None
    return int(q["bits"]), int(q.get("group_size", 64))


def _weight_count(g: Geometry) -> tuple:
    """``(linear weights, other parameters)`` of the whole model: linear
    weights (embedding and head included) are what mlx-lm quantizes."""
    block_linear = sum(i * o * c for i, o, c in g.linears())
    if g.experts:
        block_linear += g.hidden * g.experts  # the router
    other = 2 * g.hidden + (g.qkv_width if g.qkv_bias else 0)
    embed = g.vocab * g.hidden * (1 if g.tied else 2)
    return g.layers * block_linear + embed, g.layers * other + g.hidden


def stored_bytes(g: Geometry, bits: Optional[int], group_size: Optional[int], dtype_bytes: int) -> int:
    """Bytes of the weights in memory: each quantized weight ``bits / 8``
    plus a scale and a bias (``dtype_bytes`` each) per group."""
    linear, other = _weight_count(g)
    if not bits:
        return (linear + other) * dtype_bytes
    per_weight = bits / 8 + 2 * dtype_bytes / group_size
    return int(linear * per_weight) + other * dtype_bytes


def from_config(
    config: dict,
    name: str,
    source: str,
    *,
    dtype: Optional[str] = None,
    bits: Optional[int] = None,
    group_size: Optional[int] = None,
    weights_bytes: Optional[int] = None,
) -> Geometry:
    """A ``Geometry`` from a Hugging Face / mlx-lm ``config.json`` dictionary.

    ``bits`` (and ``group_size``) quantize a model whose config does not;
    ``dtype`` is the activations' dtype (default: the config's
    ``torch_dtype``, bfloat16 where it names none); ``weights_bytes``
    replaces the size computed from the shapes (the files' own size).
    """
    if not isinstance(config, dict):
        raise PlanError(f"{source}: a config must be a JSON object")
    c = _text_config(config)
    hidden = _int(c, "hidden_size", source)
    n_heads = _int(c, "num_attention_heads", source)
    n_kv = _int(c, "num_key_value_heads", source, n_heads)
    head_dim = c.get("head_dim") or hidden // n_heads
    experts = c.get("num_local_experts") or c.get("num_experts") or 0
    per_token = c.get("num_experts_per_tok") or c.get("experts_per_token") or 0
    window = c.get("sliding_window") if c.get("use_sliding_window", True) else None
    layers = _int(c, "num_hidden_layers", source)
    window_layers = 0
    if window:
        types = c.get("layer_types")
        if isinstance(types, list):
            window_layers = sum(t == "sliding_attention" for t in types)
        elif c.get("sliding_window_pattern"):
            pattern = int(c["sliding_window_pattern"])
            window_layers = layers - layers // pattern
        else:
            window_layers = layers
    model_type = str(c.get("model_type", "unknown"))
    dtype = dtype or {"float16": "float16", "float32": "float32"}.get(c.get("torch_dtype"), "bfloat16")
    q_bits, q_group = _quantization(c)
    bits = bits or q_bits
    group_size = group_size or q_group or 64
    g = Geometry(
        name=name,
        model_type=model_type,
        hidden=hidden,
        intermediate=_int(c, "intermediate_size", source),
        layers=layers,
        n_heads=n_heads,
        n_kv_heads=n_kv,
        head_dim=int(head_dim),
        vocab=_int(c, "vocab_size", source),
        tied=bool(c.get("tie_word_embeddings", True)),
        dtype=dtype,
        weights_bytes=0,
        bits=bits,
        group_size=group_size if bits else None,
        experts=int(experts),
        experts_per_token=int(per_token) if experts else 0,
        window=int(window) if window else None,
        window_layers=window_layers,
        qkv_bias=model_type in ("qwen2", "gpt_oss") or bool(c.get("attention_bias")),
    )
    if weights_bytes is None:
        weights_bytes = stored_bytes(g, bits, group_size, DTYPE_BYTES[dtype])
    return replace(g, weights_bytes=int(weights_bytes))


def _read_json(path: Path, source: str) -> dict:
    try:
        config = json.loads(path.read_text())
    except OSError as e:
        raise PlanError(f"{source}: cannot read {path}: {e.strerror}") from None
    except ValueError as e:
        raise PlanError(f"{source}: {path} is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise PlanError(f"{source}: {path} is not a JSON object")
    return config


def _safetensors_bytes(folder: Path) -> Optional[int]:
    files = sorted(folder.glob("*.safetensors"))
    files = [f for f in files if "adapter" not in f.name]
    return sum(f.stat().st_size for f in files) or None


_GGML_BITS = {"Q4_0": 4, "Q4_1": 4, "Q8_0": 8}
_GGML_BYTES = {"F32": 4, "F16": 2, "BF16": 2}


def _gguf(path: Path, source: str, dtype, bits, group_size) -> Geometry:
    from ..finetune import gguf
    from ..finetune.gguf_file import GGUFError, read_header

    try:
        header = read_header(path)
        config = gguf.model_config(header)
    except (GGUFError, KeyError) as e:
        raise PlanError(f"{source}: {e}") from None
    # As gguf.load holds them on this machine: float32 activations and
    # dequantized matrices, all float32, without a GPU; on a GPU float16, with Q4_0, Q4_1,
    # Q8_0 quantized (group 32, a scale and a bias each) and other quantized
    # types as float16, as mx.load gives them.
    dequantized = gguf.dequantizes_by_default()
    dtype = dtype or ("float32" if dequantized else "float16")
    if dequantized:
        config.pop("quantization", None)
    total = 0
    for t in header.tensors.values():
        count = 1
        for d in t.shape:
            count *= d
        if dequantized:  # every floating tensor is cast to the activation dtype
            total += count * DTYPE_BYTES[dtype]
        elif t.type in _GGML_BITS:
            total += count * _GGML_BITS[t.type] // 8 + count // gguf.GROUP_SIZE * 2 * 2
        else:
            total += count * _GGML_BYTES.get(t.type, 2)
    return from_config(config, path.stem, source, dtype=dtype, bits=bits, group_size=group_size, weights_bytes=total)


def _normalized(name: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", name.lower())


def known_from_hub_id(model: str) -> Optional[str]:
    """The shipped config a Hugging Face repo id names, if any
    (``Qwen/Qwen2.5-1.5B-Instruct`` -> ``qwen2.5-1.5b``)."""
    tail = _normalized(model.rsplit("/", 1)[-1])
    matches = [k for k in known_models() if tail.startswith(k) or f"-{k}" in f"-{tail}"]
    return max(matches, key=len) if matches else None


def resolve(
    model: str,
    *,
    dtype: Optional[str] = None,
    bits: Optional[int] = None,
    group_size: Optional[int] = None,
) -> Geometry:
    """The ``Geometry`` of ``model`` (any form in the module docstring but a
    recipe, which the CLI opens first). Raises ``PlanError`` in one line."""
    from ..finetune import builtin

    if dtype is not None and dtype not in DTYPE_BYTES:
        raise PlanError(f"--dtype: expected one of {', '.join(DTYPE_BYTES)}, got {dtype!r}")
    if builtin.is_builtin(model):
        key = model[len(builtin.PREFIX) :]
        if key not in builtin.MODELS:
            raise PlanError(f"unknown built-in model '{model}' (known: {', '.join(builtin.PREFIX + k for k in builtin.MODELS)})")
        return from_config(builtin.MODELS[key], model, model, dtype=dtype or "float32", bits=bits, group_size=group_size)
    from ..finetune import gguf

    if model in gguf.PACKAGED:
        try:
            return _gguf(gguf.file_path(model), model, dtype, bits, group_size)
        except gguf.GGUFError as e:
            raise PlanError(str(e)) from None
    text = model[len("gguf:") :] if model.startswith("gguf:") else model
    path = Path(text).expanduser()
    if text.endswith(".gguf") or model.startswith("gguf:"):
        if not path.is_file():
            raise PlanError(f"no such GGUF file: {path}")
        return _gguf(path, model, dtype, bits, group_size)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise PlanError(f"{path} has no config.json (not an mlx-lm model folder)")
        config = _read_json(path / "config.json", model)
        size = None if bits else _safetensors_bytes(path)
        return from_config(config, path.name, model, dtype=dtype, bits=bits, group_size=group_size, weights_bytes=size)
    if path.suffix == ".json":
        if not path.is_file():
            raise PlanError(f"no such config file: {path}")
        config = _read_json(path, model)
        size = None if bits else _safetensors_bytes(path.parent)
        return from_config(config, path.parent.name, model, dtype=dtype, bits=bits, group_size=group_size, weights_bytes=size)
    if "/" in model and not (CONFIGS / f"{model}.json").is_file():
        from ..finetune.config import model_config

        cached = model_config(model)  # a repo id already in the Hugging Face cache
        if cached is not None:
            return from_config(cached, model, model, dtype=dtype, bits=bits, group_size=group_size)
    known = model if (CONFIGS / f"{model}.json").is_file() else known_from_hub_id(model) if "/" in model else None
    if known is None:
        shipped_config(_normalized(model))  # raises the unknown-model error
        known = _normalized(model)
    return from_config(shipped_config(known), known, model, dtype=dtype, bits=bits, group_size=group_size)
