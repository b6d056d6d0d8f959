"""The plan of a fine-tuning recipe: what ``mlx_flash.finetune`` checks before it loads weights.

A recipe's step is the planner's ``Options``:

- fused attention unless ``attention.variant`` is ``mlx`` or ``manual``
  (the dense ``L x L`` path; a ``:padded`` entry runs the variant too);
- checkpointing from ``grad_checkpoint``, run by mlx_flash.step (bounded
  activations, its MLP in chunks of the recipe's ``chunk_tokens``) where
  the recipe has that key;
- the logit-free loss where the recipe has a ``loss`` key set to
  ``chunked`` or ``auto`` (``auto`` is counted as chunked: the larger
  logits it avoids are the ones that decide whether a run fits).
- ``chunk_tokens`` without ``grad_checkpoint`` is counted as no chunking
  (an over-estimate: the chunked MLP keeps only its input).

Rows are ``max_seq_length`` tokens (packed rows are exactly that; padded
batches at most that), ``batch_size`` of them, LoRA of the recipe's rank on
its ``num_layers`` last blocks, each row split over ``context_parallel``
ranks where the recipe has that key.
"""

import sys
from dataclasses import replace
from typing import List, Optional

from . import budget as budgets
from . import memory
from .memory import Options, Setup
from .models import PlanError, resolve
from .report import Plan, make_plan, summary_line


def _logit_free(recipe, vocab: Optional[int]) -> bool:
    """Whether the fine-tune will run the logit-free loss: ``chunked``, or
    ``auto`` above the fine-tune's own threshold of float32 logits."""
    from ..finetune.loss_choice import AUTO_THRESHOLD_BYTES, logits_bytes

    loss = getattr(recipe, "loss", "full")
    if loss != "auto" or vocab is None:
        return loss in ("chunked", "auto")
    return logits_bytes(recipe.batch_size, recipe.max_seq_length, vocab) > AUTO_THRESHOLD_BYTES


def options_of(recipe, variant: str, vocab: Optional[int] = None) -> Options:
    name = variant.partition(":")[0]
    checkpoint = bool(recipe.grad_checkpoint)
    return Options(
        fused=name not in ("mlx", "manual"),
        checkpoint=checkpoint,
        logit_free=_logit_free(recipe, vocab),
        # The fine-tune checkpoints through mlx_flash.step where it has it (ordered, chunked MLP).
        bounded=checkpoint and hasattr(recipe, "chunk_tokens"),
        chunk_tokens=getattr(recipe, "chunk_tokens", "auto"),
    )


def setup_of(recipe) -> Setup:
    return Setup(
        seq=recipe.max_seq_length,
        batch=recipe.batch_size,
        lora_layers=recipe.num_layers,
        rank=recipe.lora_parameters.get("rank", 8),
        machines=getattr(recipe, "context_parallel", 1) or 1,
    )


def plan_recipe(recipe, variant: str, budget: Optional[int] = None) -> Plan:
    """The plan of one run of ``recipe`` with ``variant`` (an ``attention.compare`` entry)."""
    g = resolve(recipe.model)
    if budget is None:
        budget, source = budgets.this_machine()
    else:
        source = "given"
    options = options_of(recipe, variant, g.vocab)
    plan = make_plan(g, setup_of(recipe), budget, source, {"run": options})
    plan.chosen = "run"
    return plan


def _changes(recipe, variant: str, options: Options, setup: Setup, g, budget: int) -> List[tuple]:
    """What could make the run fit, cheapest first: options that keep the
    training the same, then smaller batches, then shorter rows."""
    out = []
    if not options.fused:
        out.append(("--set attention.variant=auto (fused attention)", replace(options, fused=True), None))
    if not options.logit_free and hasattr(recipe, "loss"):
        out.append(("--set loss=chunked (logit-free loss)", replace(options, logit_free=True), None))
    if not options.checkpoint:
        bounded = hasattr(recipe, "chunk_tokens")
        out.append(("--set grad_checkpoint=true", replace(options, checkpoint=True, bounded=bounded), None))
    best = Options(
        fused=True,
        checkpoint=True,
        logit_free=options.logit_free or hasattr(recipe, "loss"),
        bounded=options.bounded or hasattr(recipe, "chunk_tokens"),
        chunk_tokens=options.chunk_tokens,
    )
    keys = [text.split(" (")[0] for text, *_ in out]
    together = " ".join(keys)
    if len(out) > 1:
        out.append((together, best, None))
    batch = setup.batch // 2
    while batch >= 1:
        out.append(((together + " " if together else "") + f"--set batch_size={batch}", best, replace(setup, batch=batch)))
        batch //= 2
    one = replace(setup, batch=1)
    longest = memory.max_length(g, one, best, budget, limit=max(setup.seq, 128))
    if longest:
        out.append(((together + " " if together else "") + f"--set batch_size=1 --set max_seq_length={longest}", best, replace(one, seq=longest)))
    return out


def check(recipe, variant: str, *, force: bool = False, budget: Optional[int] = None, printer=print) -> Optional[int]:
    """Print the run's plan line; raise ``PlanError`` when it is predicted not
    to fit (unless ``force``). Returns the planned peak in bytes, or None
    where the model's config is not at hand (nothing is refused then)."""
    try:
        plan = plan_recipe(recipe, variant, budget)
    except PlanError as e:
        printer(f"plan: not available ({e})")
        return None
    printer(summary_line(plan, "run"))
    prediction = plan.predictions["run"]
    if plan.fits("run"):
        return prediction.peak
    if plan.budget_source.startswith("Metal"):
        printer(f"plan: the budget is {plan.budget_source}")
    if force:
        printer("plan: --force: running anyway")
        return prediction.peak
    options, setup = prediction.options, prediction.setup
    fix = None
    for text, o, s in _changes(recipe, variant, options, setup, plan.geometry, plan.budget):
        if memory.predict(plan.geometry, s or setup, o or options).peak <= plan.budget:
            fix = text
            break
    need = f"needs {prediction.peak / budgets.GiB:.1f} GiB of {plan.budget / budgets.GiB:.1f} GiB"
    hint = f"the cheapest change that fits: {fix}" if fix else "nothing short of a larger machine fits"
    raise PlanError(f"plan: this run {need}, predicted not to fit; {hint}; or pass --force to run anyway")


def stderr_printer(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def before_loading(recipe, variant: str, writer: bool = True) -> Optional[int]:
    """The fine-tune's hook: ``check`` with the recipe's ``force``, printing on
    stderr (rank 0 only), a refusal raised as the fine-tune's ``RecipeError``."""
    from ..finetune.config import RecipeError

    try:
        return check(recipe, variant, force=getattr(recipe, "force", False), printer=stderr_printer if writer else lambda _: None)
    except PlanError as e:
        raise RecipeError(str(e)) from None
