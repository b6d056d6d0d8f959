"""``with mlx_flash.segments(ids):``: document masks for mlx-lm models, unchanged.

Packing short examples into long rows is only correct if no example attends
to its neighbours. Inside the block, every patched mlx-lm self-attention
call (``Lq == Lk == ids.shape[-1]``, no KV cache) passes ``ids`` on as
``segment_ids``, so attention stays within each document, fused and
``O(L)``::

    def loss(model, tokens, ids):
        with mlx_flash.segments(ids):      # inside the transformed function
            logits = model(tokens)
        ...
    loss_and_grad = nn.value_and_grad(model, loss)

Enter it inside the function that ``mx.compile``, ``nn.value_and_grad`` or
``mx.checkpoint`` transforms, with ``ids`` an input of that function: the
traced graph then reads the ids as an input, and a compiled step never
reuses the ids of its first call.

Exact for RoPE models without resetting positions: RoPE scores depend only
on the distance between a query and a key, and within one document that
distance is the same packed or not. Models with learned absolute position
embeddings (``gpt2``, ``gpt_bigcode``) would see each document at the wrong
positions; ``mlx_flash.finetune`` refuses to pack for them.
"""

import contextlib
import contextvars
from typing import Optional, Tuple, Union

import mlx.core as mx

SegmentIds = Union[mx.array, Tuple[mx.array, mx.array]]

_current: contextvars.ContextVar = contextvars.ContextVar("mlx_flash_segments", default=None)


@contextlib.contextmanager
def segments(ids: mx.array):
    """Document ids for every patched attention call inside the block.

    Args:
        ids: ``(B, L)`` integer document ids of the packed rows (negative:
            padding, attended by nothing and attending nothing).
    """
    if not isinstance(ids, mx.array) or ids.ndim != 2 or not mx.issubdtype(ids.dtype, mx.integer):
        shape = tuple(ids.shape) if isinstance(ids, mx.array) else type(ids).__name__
        raise ValueError(f"[mlx_flash.segments] ids must be a (batch, length) integer mx.array, got {shape}")
    token = _current.set(ids)
    try:
        yield ids
    finally:
        _current.reset(token)


def current() -> Optional[mx.array]:
    """The ids of the innermost ``segments`` block, or None outside one."""
    return _current.get()


def for_call(queries: mx.array, keys: mx.array) -> Optional[mx.array]:
    """The ids to pass to an attention call inside a ``segments`` block, or
    None outside one. Raises ``ValueError`` when the call is not
    self-attention over the block's rows (a silent dense fallback would
    train across documents)."""
    ids = _current.get()
    if ids is None:
        return None
    B, length = ids.shape
    q_len, k_len = queries.shape[2], keys.shape[2]
    if queries.shape[0] != B or q_len != length or k_len != length:
        raise ValueError(
            f"[mlx_flash.segments] ids of shape {(B, length)} do not fit an attention call with "
            f"batch {queries.shape[0]}, {q_len} queries and {k_len} keys: segments() covers "
            "self-attention over the packed rows only (no KV cache)"
        )
    return ids
