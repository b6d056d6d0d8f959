"""A LoRA step's peak memory, component by component (formulas in mlx_flash.plan).

``predict(geometry, setup, options)`` returns a ``Prediction``: bytes per
component and their sum. Every component is a coefficient times a
*feature* (a product of shapes: tokens x hidden x bytes, ...); the
coefficients of the measured modes are fitted to ``bench`` cells
(``fit.py``) and kept in ``COEFFICIENTS``; the rest are the design figures
of the code that runs (stated beside each).
"""

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional, Union

from .models import Geometry

#: Bytes per LoRA parameter over a step: the float32 parameter, its
#: gradient and Adam's two moments.
LORA_BYTES_PER_PARAMETER = 16

#: The logit-free loss (mlx_flash.losses), by its design: the float32
#: log-sum-exp per token and, for a frozen head, the float32 gradient
#: direction per token (hidden values), plus about four float32 chunks of
#: ``token_chunk x vocab_chunk`` logits while it runs.
LOSS_TOKEN_CHUNK = 512
LOSS_VOCAB_CHUNK = 8192
LOSS_CHUNK_COPIES = 4


@dataclass(frozen=True)
class Setup:
    """What one step runs: ``batch`` rows of ``seq`` tokens, LoRA of ``rank``
    on the last ``lora_layers`` blocks (-1: all), across ``machines`` ranks of
    context parallelism (each holds ``seq / machines`` tokens of every row)."""

    seq: int
    batch: int = 1
    lora_layers: int = -1
    rank: int = 8
    machines: int = 1


@dataclass(frozen=True)
class Options:
    """The mlx-flash options of a step (all off: stock mlx-lm)."""

    fused: bool = False  # mlx-flash's fused attention (segments, windows): no L x L scores
    checkpoint: bool = False  # per-layer checkpointing (mlx-lm's grad_checkpoint or step.py's)
    logit_free: bool = False  # mlx_flash.losses: never the (L, V) logits
    bounded: bool = False  # mlx_flash.step: ordered checkpointing + chunked MLP
    chunk_tokens: Union[int, str] = "auto"  # with bounded: step.py's MLP chunk ("auto", 0 = whole, or tokens)

    @property
    def name(self) -> str:
        if self.bounded:
            return "all" if self.logit_free and self.fused else "bounded"
        base = "fused" if self.fused else "stock"
        if self.logit_free:
            base += "+loss"
        if self.checkpoint:
            base += "+ckpt"
        return base


#: The modes the planner prints, in order: stock mlx-lm, then mlx-flash's
#: options one on top of the other.
MODES = {
    "stock": Options(),
    "stock+ckpt": Options(checkpoint=True),
    "fused": Options(fused=True),
    "fused+loss": Options(fused=True, logit_free=True),
    "all": Options(fused=True, checkpoint=True, logit_free=True, bounded=True),
}

#: Design coefficients per family (``plain``: no checkpointing; ``ckpt``:
#: mlx-lm's grad_checkpoint; ``bounded``: step.py), one per feature of
#: ``features()``: copies of each shape a careful count of the step's arrays
#: gives. Used for a family no measurement has fitted.
DESIGN: Dict[str, Dict[str, float]] = {
    "plain": {"layer_h": 6.0, "layer_i": 4.0, "layer_qkv": 2.0, "work": 2.0, "scores": 2.0, "logits": 4.0,
              "loss_tokens": 1.0, "loss_chunks": 1.0},
    "ckpt": {"layer_i": 0.0, "work_h": 6.0, "work_i": 4.0, "work_qkv": 2.0, "logits": 4.0,
             "loss_tokens": 1.0, "loss_chunks": 1.0},
    "bounded": {"work_h": 6.0, "work_qkv": 3.0, "chunk_i": 6.0, "loss_tokens": 1.0, "loss_chunks": 1.0},
}


def _load_fitted():
    """The fitted coefficients (coefficients.json, written by fit.py) over
    the design ones, and the measurement files they came from."""
    path = Path(__file__).resolve().parent / "coefficients.json"
    coefficients = {name: dict(values) for name, values in DESIGN.items()}
    if not path.is_file():
        return coefficients, []
    data = json.loads(path.read_text())
    for name, values in data["coefficients"].items():
        coefficients[name] = dict(values)
    return coefficients, data.get("fitted_from", [])


#: Coefficients the planner uses, and the measurements that fitted them.
COEFFICIENTS, FITTED_FROM = _load_fitted()

#: Features counted once, not fitted: the layer inputs a checkpointed step
#: must keep (every layer's, until its backward), the fused attention's
#: log-sum-exp, and with checkpointing one layer's dense scores (the layer
#: being differentiated holds its softmax).
EXACT = ("inputs", "lse", "one_layer_scores")

#: Component each feature belongs to, in print order.
COMPONENTS = {
    "lora": "LoRA parameters + optimizer state",
    "saved": "saved activations",
    "layer": "one layer's working set",
    "attention": "attention",
    "loss": "loss",
}
_COMPONENT_OF = {
    "layer_h": "saved", "layer_i": "saved", "layer_qkv": "saved", "inputs": "saved",
    "work": "layer", "work_h": "layer", "work_i": "layer", "work_qkv": "layer", "chunk_i": "layer",
    "scores": "attention", "one_layer_scores": "attention", "lse": "attention", "logits": "loss", "loss_tokens": "loss", "loss_chunks": "loss",
}  # fmt: skip


@dataclass
class Prediction:
    geometry: Geometry
    setup: Setup
    options: Options
    components: Dict[str, int] = field(default_factory=dict)

    @property
    def above_weights(self) -> int:
        return sum(self.components.values())

    @property
    def peak(self) -> int:
        return self.geometry.weights_bytes + self.above_weights


def lora_parameters(g: Geometry, lora_layers: int, rank: int) -> int:
    """mlx-lm's LoRA on every linear layer of the last ``lora_layers`` blocks."""
    per_block = sum(rank * (i + o) * c for i, o, c in g.linears())
    return trained_layers(g, lora_layers) * per_block


def trained_layers(g: Geometry, lora_layers: int) -> int:
    return g.layers if lora_layers < 0 else min(lora_layers, g.layers)


def mlp_chunk(g: Geometry, tokens: int, chunk_tokens="auto", batch: int = 1) -> int:
    """Tokens per MLP chunk that mlx_flash.step picks for rows of ``tokens``."""
    from ..step import chunk_size

    return chunk_size(chunk_tokens, tokens, g.hidden, g.mlp_width, batch)


def features(g: Geometry, setup: Setup, options: Options) -> Dict[str, float]:
    """The shape products the coefficients multiply, in bytes, per rank.

    ``T`` tokens on this rank (``batch x seq / machines``), ``k`` the blocks
    the backward passes through, ``s`` the activations' bytes per element.
    """
    s = g.dtype_bytes
    k = trained_layers(g, setup.lora_layers)
    local = -(-setup.seq // setup.machines)
    T = setup.batch * local
    H, I, A = g.hidden, g.mlp_width, g.qkv_width
    # Context parallelism gathers every rank's keys and values for each layer:
    # the whole row's K and V (and their gradients in the backward).
    gathered = setup.batch * (setup.seq - local) * 2 * g.n_kv_heads * g.head_dim * s if setup.machines > 1 else 0
    f: Dict[str, float] = {}
    if options.bounded:
        f["inputs"] = k * T * H * s
        f["work_h"] = T * H * s
        f["work_qkv"] = T * A * s + gathered
        f["chunk_i"] = setup.batch * mlp_chunk(g, local, options.chunk_tokens, setup.batch) * I * s
    elif options.checkpoint:
        f["inputs"] = k * T * H * s
        f["layer_i"] = k * T * I * s
        f["work_h"] = T * H * s
        f["work_i"] = T * I * s
        f["work_qkv"] = T * A * s + gathered
    else:
        f["layer_h"] = k * T * H * s
        f["layer_i"] = k * T * I * s
        f["layer_qkv"] = k * (T * A * s + gathered)
        f["work"] = T * (H + I) * s
    if options.fused:
        f["lse"] = k * T * g.n_heads * 4  # the float32 log-sum-exp per query and head, kept for the backward
    else:
        # Dense (B, Hq, L/N, L) scores per layer: sliding-window layers get a
        # dense window mask from mlx-lm, as large as the causal one.
        scores = setup.batch * g.n_heads * local * setup.seq * s
        if options.checkpoint:
            # At least the recomputed layer's softmax is alive in its backward.
            f["one_layer_scores"] = scores
        else:
            f["scores"] = k * scores
    if options.logit_free:
        chunk = min(T, LOSS_TOKEN_CHUNK) * min(g.vocab, LOSS_VOCAB_CHUNK)
        f["loss_tokens"] = T * (H + 1) * 4
        f["loss_chunks"] = LOSS_CHUNK_COPIES * chunk * 4
    else:
        f["logits"] = T * g.vocab * s
    return f


def family(options: Options) -> str:
    return "bounded" if options.bounded else "ckpt" if options.checkpoint else "plain"


def predict(g: Geometry, setup: Setup, options: Options, coefficients=None) -> Prediction:
    """Bytes of each component of one step's peak above the weights."""
    if setup.seq <= 0 or setup.batch <= 0 or setup.machines <= 0:
        raise ValueError("sequence length, batch and machines must be positive")
    coefficients = coefficients or COEFFICIENTS
    c = coefficients[family(options)]
    out = Prediction(g, setup, options)
    out.components["lora"] = LORA_BYTES_PER_PARAMETER * lora_parameters(g, setup.lora_layers, setup.rank)
    for name, value in features(g, setup, options).items():
        component = _COMPONENT_OF[name]
        weight = 1.0 if name in EXACT else c.get(name, 1.0)
        out.components[component] = out.components.get(component, 0) + int(weight * value)
    for name in COMPONENTS:
        out.components.setdefault(name, 0)
    return out


def max_length(g: Geometry, setup: Setup, options: Options, budget: int, limit: int = 1 << 22, step: int = 128) -> int:
    """The largest sequence length (a multiple of ``step``) whose predicted
    peak fits ``budget`` bytes; 0 when not even ``step`` tokens fit."""

    def fits(n: int) -> bool:
        return predict(g, _with_seq(setup, n * step), options).peak <= budget

    lo, hi = 0, limit // step
    if fits(hi):
        return hi * step
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo * step


def _with_seq(setup: Setup, seq: int) -> Setup:
    return Setup(seq=seq, batch=setup.batch, lora_layers=setup.lora_layers, rank=setup.rank, machines=setup.machines)
