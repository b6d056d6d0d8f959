"""Which loss a fine-tune runs: ``loss: full | chunked | auto``.

``full`` is mlx-lm's ``default_loss`` (or, for packed rows, the same with
document ids): the model's full logits and ``nn.losses.cross_entropy``.
``chunked`` is ``mlx_flash.losses``: the same loss without ever holding the
``(B*L, V)`` logits. ``auto`` (the default) runs ``chunked`` when the float32
logits of one step's batch, ``B * L * V * 4`` bytes, would exceed
``AUTO_THRESHOLD_BYTES`` (256 MiB), and ``full`` below it.

Why 256 MiB: the full path holds about four logit-sized arrays (logits,
their shifted copy and exponentials, the gradient), so at the threshold it
adds about 1 GiB to a step, while the chunked loss holds 16 MiB chunks
whatever the batch (mlx_flash/losses.py). Below it, the full path's extra
memory is small next to a model's weights and its single large matrix
product is the simplest path; above it, the logits dominate a LoRA step
(Qwen2.5's 151,936-token vocabulary crosses it at 442 tokens a batch,
SmolLM2's 49,152 at 1,366). Loss and gradients are the same either way.

Before a chunked run, ``check_split`` compares the model's own logits with
``head(final_hidden(...))`` on a few tokens, so a model whose logits are not
what the split reads is refused (``chunked``) or runs ``full`` (``auto``),
never trained on a different loss.
"""

from typing import Callable, Tuple

import mlx.core as mx

from .. import losses
from ..documents import segments

AUTO_THRESHOLD_BYTES = 1 << 28
CHOICES = ("full", "chunked", "auto")


def logits_bytes(batch_size: int, length: int, vocab_size: int) -> int:
    """Bytes of one step's float32 logits ``(batch_size * length, vocab_size)``."""
    return 4 * batch_size * length * vocab_size


def chunked_packed_loss(model, tokens, ids, targets):
    """``packing.packed_loss`` through the chunked loss: the mean next-token
    loss over the counted targets of packed rows, and their count."""
    with segments(ids[:, :-1]):
        hidden = losses.final_hidden(model, tokens[:, :-1])
    ce = losses.linear_cross_entropy(hidden, losses.head_of(model), tokens[:, 1:], targets)
    n_targets = targets.sum()
    return ce.sum() / n_targets, n_targets


def check_split(model, tokens: int = 8) -> None:
    """Raise ``ValueError`` (one line) unless ``head_of(model)`` applied to
    ``final_hidden(model, x)`` gives the model's logits for a few tokens."""
    head = losses.head_of(model)
    x = mx.arange(tokens)[None] % head.vocab_size
    training = model.training
    model.eval()  # no dropout in the comparison
    try:
        full = model(x).astype(mx.float32)
        split = head(losses.final_hidden(model, x)).astype(mx.float32)
    finally:
        model.train(training)
    diff = mx.abs(full - split).max().item()
    scale = max(mx.abs(full).max().item(), 1e-6)
    tol = 1e-4 if full.dtype == mx.float32 and head.weight.dtype == mx.float32 else 2e-2
    if not diff <= tol * scale:
        raise ValueError(
            f"chunked loss: model type '{losses._model_type(model)}' computes logits its split does not reproduce "
            f"(max difference {diff:.3g}); use loss: full"
        )


def choose(setting: str, model, batch_size: int, length: int, packed: bool, default_loss: Callable,
           packed_loss: Callable) -> Tuple[str, Callable, str]:
    """``(name, loss function, reason)`` for recipe key ``loss``.

    ``name`` is ``"full"`` or ``"chunked"``; the function takes the batch
    the fine-tune's step passes (``default_loss``'s or ``packed_loss``'s
    arguments). Raises ``ValueError`` for ``chunked`` on a model the split
    refuses.
    """
    if setting not in CHOICES:
        raise ValueError(f"loss: unknown value '{setting}' (choose from {', '.join(CHOICES)})")
    full = packed_loss if packed else default_loss
    chunked = chunked_packed_loss if packed else losses.chunked_loss
    if setting == "full":
        return "full", full, "loss: full"
    try:
        size = logits_bytes(batch_size, length, losses.head_of(model).vocab_size)
        if setting == "auto" and size <= AUTO_THRESHOLD_BYTES:
            return "full", full, f"auto: logits {size / 2**20:.0f} MiB <= {AUTO_THRESHOLD_BYTES / 2**20:.0f} MiB"
        check_split(model)
    except ValueError as e:
        if setting == "chunked":
            raise
        return "full", full, f"auto: {e}"
    if setting == "chunked":
        return "chunked", chunked, "loss: chunked"
    return "chunked", chunked, f"auto: logits {size / 2**20:.0f} MiB > {AUTO_THRESHOLD_BYTES / 2**20:.0f} MiB"
