"""What the doctor validates and times: the grids, and a model's attention shapes.

Validation covers every kernel unit (``mlx_flash.validation``) of the
chosen families, dtypes, head dims and mask kinds; timing covers
fine-tuning problems, the user's model's (``--model``, ``--recipe``: heads,
KV heads, head dim and dtype from its ``config.json``, without loading
weights; length, batch and packing from the recipe) or a default grid.

==========  =================================  ===============================
level       validation                         timing (Metal only)
==========  =================================  ===============================
quick       float16, head dims 64 and 128      forward+backward, L 2048,
            (the model's dtype and head dims)  causal and packed
default     every dtype and head dim of each   forward and forward+backward,
            family (the model's)               L 512..4096, causal and packed,
                                               ``blockwise`` beside the kernels
full        default, plus a second problem     default plus L 8192, windows
            per unit (longer, other seed)      and sinks
==========  =================================  ===============================

Packed rows are documents of 128 to 1024 tokens (``causal+docs128-1024``),
the shape of packed fine-tuning data. Timing heads are 16 query heads on 4
KV heads at head dims 64 and 128, batch 1, bfloat16, unless the model says
otherwise.
"""

from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from .. import validation, verdicts
from ..families import names as family_names

LEVELS = ("quick", "default", "full")

#: A packed fine-tuning row: documents of 128..1024 tokens (bench mask syntax).
PACKED = "causal+docs128-1024"


class DoctorError(ValueError):
    """Bad input for the doctor: one line, exit status 2."""


@dataclass(frozen=True)
class Geometry:
    """The attention shape of a model, and how a recipe trains it."""

    source: str
    heads: int
    kv_heads: int
    head_dim: int
    value_dim: int
    dtype: str
    window: Optional[int] = None
    sinks: bool = False
    seq: Optional[int] = None
    batch: int = 1
    packed: bool = False
    notes: Tuple[str, ...] = field(default=())

    def describe(self) -> str:
        parts = [f"{self.heads} query heads, {self.kv_heads} KV heads, head dim {self.head_dim}"]
        if self.value_dim != self.head_dim:
            parts.append(f"value head dim {self.value_dim}")
        parts.append(self.dtype)
        if self.window:
            parts.append(f"sliding window {self.window}")
        if self.sinks:
            parts.append("attention sinks")
        if self.seq:
            parts.append(f"batch {self.batch} x {self.seq} tokens" + (", packed" if self.packed else ""))
        return f"{self.source}: " + ", ".join(parts)


_DTYPES = {"bfloat16": "bfloat16", "float16": "float16", "float32": "float32", "half": "float16", "float": "float32"}


def from_config(config: dict, source: str) -> Geometry:
    """The attention geometry in a Hugging Face / mlx-lm ``config.json``
    (a ``text_config`` inside it wins, as for multimodal models)."""
    c = {**config, **(config.get("text_config") or {})}

    def positive(name) -> Optional[int]:
        value = c.get(name)
        if value is None:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise DoctorError(f"{source}: config.json has {name} = {value!r}, not a positive integer")
        return value

    heads = positive("num_attention_heads")
    if heads is None:
        raise DoctorError(f"{source}: config.json has no num_attention_heads (not a transformer model config?)")
    kv_heads = positive("num_key_value_heads") or heads
    if heads % kv_heads:
        raise DoctorError(f"{source}: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    notes = []
    if positive("qk_nope_head_dim") is not None and positive("v_head_dim") is not None:
        # Multi-head latent attention (DeepSeek): queries and keys carry a rotary part.
        head_dim = positive("qk_nope_head_dim") + (positive("qk_rope_head_dim") or 0)
        value_dim = positive("v_head_dim")
    else:
        head_dim = positive("head_dim")
        if head_dim is None:
            hidden = positive("hidden_size")
            if hidden is None:
                raise DoctorError(f"{source}: config.json has neither head_dim nor hidden_size")
            head_dim = hidden // heads
        value_dim = head_dim
    name = str(c.get("torch_dtype") or c.get("dtype") or "").replace("torch.", "")
    dtype = _DTYPES.get(name)
    if dtype is None:
        dtype = "float16"
        notes.append(f"config.json names no dtype we know ({name or 'none'}): assuming float16")
    window = c.get("sliding_window")
    if not isinstance(window, int) or isinstance(window, bool) or window < 1 or c.get("use_sliding_window") is False:
        window = None
    sinks = c.get("model_type") == "gpt_oss"
    return Geometry(source, heads, kv_heads, head_dim, value_dim, dtype, window, sinks, notes=tuple(notes))


def from_model(model: str) -> Geometry:
    """The geometry of ``model``: a local mlx-lm / Hugging Face model folder,
    ``builtin:<name>``, or a Hugging Face repo id already in the Hugging Face
    cache. Only ``config.json`` is read."""
    from ..finetune.config import model_config

    config = model_config(model)
    if config is None:
        if Path(model).is_dir():
            raise DoctorError(f"--model: {model} has no readable config.json")
        if Path(model).expanduser().exists():
            raise DoctorError(f"--model: {model} is a file; give the model's folder (the one with config.json)")
        raise DoctorError(
            f"--model: no model folder {model}, and no config.json for it in the Hugging Face cache "
            "(download the model once, or give its local folder)"
        )
    return from_config(config, model)


def from_recipe(recipe: str) -> Geometry:
    """The geometry of a fine-tuning recipe's model, with its
    ``max_seq_length``, ``batch_size`` and ``pack_sequences``."""
    from ..finetune.config import RecipeError, load_recipe, model_config

    try:
        values = load_recipe(recipe)
    except RecipeError as e:
        raise DoctorError(f"--recipe: {e}") from None
    config = model_config(values.model)
    if config is None:
        raise DoctorError(
            f"--recipe: {recipe}: no config.json for model {values.model} here "
            "(download the model once, e.g. with a first fine-tuning run, or point the recipe at its folder)"
        )
    geometry = from_config(config, f"{values.model} (recipe {values.recipe})")
    return Geometry(
        geometry.source, geometry.heads, geometry.kv_heads, geometry.head_dim, geometry.value_dim,
        geometry.dtype, geometry.window, geometry.sinks, values.max_seq_length, values.batch_size,
        bool(values.pack_sequences), geometry.notes,
    )  # fmt: skip


def parse_head_dims(text: str) -> Tuple[int, int]:
    """``"64"`` -> ``(64, 64)``; ``"128x64"`` -> ``(128, 64)``."""
    parts = text.lower().split("x")
    try:
        dims = tuple(int(p) for p in parts)
    except ValueError:
        dims = ()
    if len(dims) not in (1, 2) or min(dims) < 1:
        raise DoctorError(f"--head-dim: expected D or DxDv (e.g. 64 or 128x64), got {text!r}")
    return (dims[0], dims[-1])


def validation_units(
    level: str,
    geometry: Optional[Geometry] = None,
    families: Sequence[str] = family_names(),
    dtypes: Optional[Sequence[str]] = None,
    head_dims: Optional[Sequence[Tuple[int, int]]] = None,
    kinds: Sequence[str] = verdicts.MASK_KINDS,
) -> List[validation.Unit]:
    """The units to validate (see the module docstring): explicit
    ``dtypes`` / ``head_dims`` win, then the model's, then the level's."""
    if geometry is not None:
        dtypes = dtypes or (geometry.dtype,)
        head_dims = head_dims or ((geometry.head_dim, geometry.value_dim),)
    elif level == "quick":
        dtypes = dtypes or ("float16",)
        head_dims = head_dims or ((64, 64), (128, 128))
    return validation.units(families, dtypes, head_dims, kinds)


def validation_shapes(level: str) -> List[validation.Shape]:
    """The problems each unit is checked on."""
    shapes = [validation.Shape()]
    if level == "full":
        shapes.append(validation.Shape(batch=2, length=301, seed=1))
    return shapes


@dataclass(frozen=True)
class TimingPlan:
    """The timing grid: ``harness.Config`` fields and the variants to time."""

    configs: list
    variants: Tuple[str, ...]
    repeats: int


def timing_plan(
    level: str,
    geometry: Optional[Geometry] = None,
    dtypes: Optional[Sequence[str]] = None,
    head_dims: Optional[Sequence[Tuple[int, int]]] = None,
) -> TimingPlan:
    """The fine-tuning problems to time (see the module docstring). Head dims
    with ``Dv != D`` are not timed (the benchmark's problems have ``Dv = D``)."""
    from ..bench import harness

    modes = ("fwdbwd",) if level == "quick" else ("fwd", "fwdbwd")
    # Every level times the kernels against MLX; beyond quick, also against
    # blockwise (the portable fallback auto would otherwise take).
    variants = ("mlx",) + family_names() + (("blockwise",) if level != "quick" else ())
    repeats = 5 if level == "full" else 3
    heads, kv_heads, batch = 16, 4, 1
    dims = [64, 128] if level != "quick" else [128]
    dtype_list = ["bfloat16"]
    seqs = {"quick": [2048], "default": [512, 1024, 2048, 4096], "full": [512, 1024, 2048, 4096, 8192]}[level]
    masks = ["causal", PACKED]
    if level == "full":
        masks += ["causal+window512", "causal+window512+sinks"]
    if geometry is not None:
        heads, kv_heads, batch = geometry.heads, geometry.kv_heads, geometry.batch
        dims = [geometry.head_dim] if geometry.value_dim == geometry.head_dim else []
        dtype_list = [geometry.dtype]
        if geometry.seq:
            top = geometry.seq
            seqs = [top] if level == "quick" else sorted({max(256, top // 4), max(256, top // 2), top})
            seqs += [2 * top] if level == "full" else []
        # The model's layers: full causal, and windowed where it has a
        # sliding window (alternating layers have both), each with sinks
        # where the model has them.
        masks = ["causal", PACKED]
        if geometry.window and geometry.window < max(seqs):
            masks += [f"{m}+window{geometry.window}" for m in masks]
        if geometry.sinks:
            masks = [f"{m}+sinks" for m in masks]
    if head_dims:
        dims = [d for d, dv in head_dims if d == dv]
    if dtypes:
        dtype_list = list(dtypes)
    configs = [
        harness.Config(mode, batch, seq, heads, kv_heads, dim, mask, dtype)
        for mode in modes
        for dtype in dtype_list
        for dim in dims
        for mask in masks
        for seq in seqs
    ]
    return TimingPlan(configs, variants, repeats)
