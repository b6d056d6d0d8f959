"""One attention call, as every implementation below the dispatcher takes it.

``AttentionCall`` holds the normalised inputs (see ``mlx_flash.attention``):
``q (B, Hq, Lq, D)``, ``k (B, Hkv, Lk, D)``, ``v (B, Hkv, Lk, Dv)`` in one
floating dtype, the score scale (None where only the implementation is
chosen, as ``explain`` does), the ``StructuredMask`` (causal only with
``Lq <= Lk``) and the optional ``(Hq,)`` sink logits. A backward call also
carries ``dout (B, Hq, Lq, Dv)``, the forward's float32 log-sum-exp
``lse (B, Hq, Lq)`` and ``delta = rowsum(dout * out)`` ``(B, Hq, Lq)``
float32. The value travels from the dispatcher through the custom op to the
launchers, which read what they need from it.
"""

from dataclasses import dataclass, replace
from typing import Optional

import mlx.core as mx

from .masks import StructuredMask


@dataclass(frozen=True)
class AttentionCall:
    """The inputs of one attention call (see the module docstring)."""

    q: mx.array
    k: mx.array
    v: mx.array
    scale: Optional[float]
    mask: StructuredMask
    sinks: Optional[mx.array] = None
    dout: Optional[mx.array] = None
    lse: Optional[mx.array] = None
    delta: Optional[mx.array] = None

    @property
    def is_backward(self) -> bool:
        """Whether the call carries the backward's ``dout``, ``lse``, ``delta``."""
        return self.dout is not None

    @property
    def group(self) -> int:
        """Query heads per KV head (1 without GQA)."""
        return self.q.shape[1] // self.k.shape[1]

    def backward(self, dout: mx.array, lse: mx.array, delta: mx.array) -> "AttentionCall":
        """The same call with the backward's inputs."""
        return replace(self, dout=dout, lse=lse, delta=delta)

    def kv_heads(self, start: int, stop: int) -> "AttentionCall":
        """The same call restricted to KV heads ``[start, stop)`` and their
        query heads (``group`` per KV head): an attention problem of its own,
        since no head reads another's rows. A mask array with a head axis
        and the sinks keep those query heads' entries."""
        g = self.group
        rows = slice(start * g, stop * g)

        def heads(x):
            return None if x is None else x[:, rows]

        mask = self.mask
        if mask.array is not None and mask.array.ndim == 4 and mask.array.shape[1] > 1:
            mask = mask.with_array(mask.array[:, rows])
        return replace(
            self,
            q=self.q[:, rows],
            k=self.k[:, start:stop],
            v=self.v[:, start:stop],
            mask=mask,
            sinks=None if self.sinks is None else self.sinks[rows],
            dout=heads(self.dout),
            lse=heads(self.lse),
            delta=heads(self.delta),
        )
