"""A plan: every mode's predicted peak and longest row for one model and budget, as text or JSON."""

from dataclasses import dataclass, field, replace
from typing import Dict, List, Optional

from . import memory
from .budget import GiB
from .memory import MODES, Options, Setup
from .models import Geometry

LABELS = {
    "stock": "stock mlx-lm",
    "stock+ckpt": "stock + grad_checkpoint",
    "fused": "mlx-flash attention",
    "fused+loss": "+ logit-free loss",
    "all": "+ bounded activations",
}


@dataclass
class Plan:
    geometry: Geometry
    setup: Setup
    budget: int
    budget_source: str
    predictions: Dict[str, memory.Prediction] = field(default_factory=dict)
    max_lengths: Dict[str, int] = field(default_factory=dict)
    chosen: Optional[str] = None  # the mode a run would use, when planning a run

    def fits(self, mode: str) -> bool:
        return self.predictions[mode].peak <= self.budget


def make_plan(g: Geometry, setup: Setup, budget: int, budget_source: str, modes: Optional[Dict[str, Options]] = None) -> Plan:
    plan = Plan(g, setup, budget, budget_source)
    for name, options in (modes or MODES).items():
        plan.predictions[name] = memory.predict(g, setup, options)
        plan.max_lengths[name] = memory.max_length(g, setup, options, budget)
    return plan


def gib(n: int) -> str:
    return f"{n / GiB:.2f}"


def _weights_text(g: Geometry) -> str:
    if g.bits:
        return f"{g.bits}-bit, group {g.group_size}, {g.dtype} scales and biases"
    return g.dtype


def describe_model(g: Geometry) -> str:
    moe = f", {g.experts} experts ({g.experts_per_token} per token)" if g.experts else ""
    window = f", window {g.window} on {g.window_layers} layers" if g.window_layers else ""
    return (
        f"{g.name} ({g.model_type}, {g.layers} layers, hidden {g.hidden}, MLP {g.intermediate}{moe}, "
        f"{g.n_heads}/{g.n_kv_heads} heads x {g.head_dim}, vocab {g.vocab}{window}); "
        f"weights {gib(g.weights_bytes)} GiB ({_weights_text(g)}), activations {g.dtype}"
    )


def describe_options(options: Options) -> str:
    """``fused attention, grad_checkpoint, full logits``: what a step runs, in words."""
    parts = ["fused attention" if options.fused else "dense-mask attention"]
    if options.bounded:
        parts.append("bounded activations")
    elif options.checkpoint:
        parts.append("grad_checkpoint")
    parts.append("logit-free loss" if options.logit_free else "full logits")
    return ", ".join(parts)


def summary_line(plan: Plan, mode: str) -> str:
    """One line: what a run in ``mode`` needs of the budget."""
    p = plan.predictions[mode]
    verdict = "fits" if plan.fits(mode) else "does NOT fit"
    s = plan.setup
    return (
        f"plan: needs {p.peak / GiB:.1f} GiB of {plan.budget / GiB:.1f} GiB ({verdict}; {describe_options(p.options)}, "
        f"{s.batch} x {s.seq} tokens, LoRA rank {s.rank} on {memory.trained_layers(plan.geometry, s.lora_layers)} layers; "
        f"longest row that fits: {plan.max_lengths[mode]:,} tokens)"
    )


def text(plan: Plan) -> str:
    g, s = plan.geometry, plan.setup
    names = list(plan.predictions)
    lines = [
        describe_model(g),
        f"step: {s.batch} row(s) x {s.seq:,} tokens, LoRA rank {s.rank} on {memory.trained_layers(g, s.lora_layers)} layers"
        + (f", context parallel over {s.machines} machines ({-(-s.seq // s.machines):,} tokens each)" if s.machines > 1 else ""),
        f"budget: {gib(plan.budget)} GiB ({plan.budget_source})",
        "",
    ]
    width = 34
    lines.append("GiB".ljust(width) + "".join(f"{n:>12}" for n in names))
    lines.append("weights (as stored)".ljust(width) + "".join(f"{gib(g.weights_bytes):>12}" for _ in names))
    for key, label in memory.COMPONENTS.items():
        lines.append(label.ljust(width) + "".join(f"{gib(plan.predictions[n].components[key]):>12}" for n in names))
    lines.append("predicted peak".ljust(width) + "".join(f"{gib(plan.predictions[n].peak):>12}" for n in names))
    lines.append("fits the budget".ljust(width) + "".join(f"{'yes' if plan.fits(n) else 'NO':>12}" for n in names))
    lines.append("longest row that fits (tokens)".ljust(width) + "".join(f"{plan.max_lengths[n]:>12,}" for n in names))
    lines += ["", "modes: " + "; ".join(f"{n} = {LABELS[n]}" for n in names if n in LABELS)]
    if memory.FITTED_FROM:
        lines.append(
            f"coefficients fitted to the float32 CPU steps measured in {', '.join(memory.FITTED_FROM)}; "
            "other dtypes scaled by their bytes"
        )
    else:
        lines.append("design coefficients: no measurement has fitted them (python -m mlx_flash.plan.fit)")
    best = "all" if "all" in plan.predictions else names[-1]
    lines.append(summary_line(plan, best))
    return "\n".join(lines)


def as_dict(plan: Plan) -> dict:
    g, s = plan.geometry, plan.setup
    return {
        "model": {
            "name": g.name, "model_type": g.model_type, "layers": g.layers, "hidden": g.hidden,
            "intermediate": g.intermediate, "heads": g.n_heads, "kv_heads": g.n_kv_heads, "head_dim": g.head_dim,
            "vocab": g.vocab, "dtype": g.dtype, "bits": g.bits, "group_size": g.group_size,
            "experts": g.experts, "experts_per_token": g.experts_per_token, "weights_bytes": g.weights_bytes,
        },
        "setup": {"seq_len": s.seq, "batch": s.batch, "lora_layers": memory.trained_layers(g, s.lora_layers),
                  "lora_rank": s.rank, "machines": s.machines},
        "budget_bytes": plan.budget,
        "budget_source": plan.budget_source,
        "modes": {
            name: {
                "label": LABELS.get(name, name),
                "components_bytes": {"weights": g.weights_bytes, **p.components},
                "peak_bytes": p.peak,
                "peak_above_weights_bytes": p.above_weights,
                "fits": plan.fits(name),
                "max_seq_len": plan.max_lengths[name],
            }
            for name, p in plan.predictions.items()
        },
        "fitted_from": memory.FITTED_FROM,
    }  # fmt: skip


def cheapest_fix(g: Geometry, setup: Setup, options: Options, budget: int, changes: List[tuple]) -> Optional[str]:
    """The first of ``changes`` (``(description, options or None, setup or
    None)``, cheapest first) whose prediction fits ``budget``."""
    for description, new_options, new_setup in changes:
        o = new_options or options
        s = new_setup or setup
        if s.seq > 0 and s.batch > 0 and memory.predict(g, s, o).peak <= budget:
            return description
    return None


def shorter(setup: Setup, seq: int) -> Setup:
    return replace(setup, seq=seq)
