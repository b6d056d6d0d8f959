"""Bounded activations for an mlx-lm training step.

    import mlx_flash
    restore = mlx_flash.bound_activations(model, checkpoint=True, chunk_tokens="auto")
    ...                                   # train as usual: nn.value_and_grad(model, loss)
    restore()                             # the model's own layers and MLPs are back

A LoRA step on a long row should hold, above the weights, the saved input of
every layer (``layers x B x L x hidden``) plus one layer's working set. MLX
does not give that by itself. What we found, reading its scheduler
(``eval_impl`` in ``mlx/transforms.cpp``, 0.32) and measuring:

1. **The whole step is one lazy graph, run in reverse breadth-first order.**
   ``mx.eval`` builds its tape breadth-first from the outputs (a frontier of
   at most ``MLX_BFS_MAX_WIDTH = 20`` arrays, beyond which it descends
   depth-first) and executes the tape backwards: what is farthest from the
   outputs runs first, and an array lives until its last consumer has run.
2. **Weight gradients run last and keep their operands.** A LoRA gradient
   (``x^T (dy B^T)``, ``(x A)^T dy``) is an output of the step, one hop from
   the end of the tape, so it runs at the very end and holds its operands,
   among them the recomputed input of the MLP's down projection (``L x
   intermediate``), of every layer, until then. With ``mx.checkpoint``
   (mlx-lm's ``grad_checkpoint``) the peak grows by about one such array per
   layer.
3. **``mx.checkpoint``'s recompute waits on the forward only.** Its vjp is
   ``vjp(fun, depends(primals, outputs), cotangents)``: nothing orders layer
   ``i``'s recompute after layer ``i + 1``'s backward.
4. **One layer's MLP is ``O(L x intermediate)``**: gate, up, their product
   and their gradients, several ``L x intermediate`` arrays at once, which
   checkpointing cannot touch.

Measured (tiny llama, hidden 64, intermediate 2048, L=2048 causal, LoRA on
every linear layer, float32; peak above the inputs at 2 / 4 / 8 layers): no
checkpointing 271 / 440 / 779 MiB; ``mx.checkpoint`` 251 / 286 / 334 MiB
(12 MiB a layer: about one ``L x intermediate`` float32 array, 16 MiB);
ordering the input gradient after the parameter gradients alone - / 259 /
281 MiB; ordering the recompute after the cotangent alone - / 316 / 333 MiB
(no better than ``mx.checkpoint``: the deferred weight gradients dominate);
both 251 / 252 / 254 MiB, flat in the layer count. At Qwen2.5-1.5B's shape
(hidden 1536, intermediate 8960, 12/2 heads, vocab 1024, 4 layers, one
packed row of 8 documents, fused attention): at L=1024 no checkpointing
1.13 GiB, ``mx.checkpoint`` 0.77, both orderings 0.64, and with MLP chunks
of 256 tokens 0.24 GiB; at L=4096 ``mx.checkpoint`` 2.90 GiB where the saved
inputs are 96 MiB, both orderings with chunks of 512 tokens 0.70 GiB.

And one composition bug: ``mlx_flash.segments`` is a context entered inside
the loss, but a checkpoint's recompute runs when the backward is built,
after the loss has returned, so mlx-lm's ``grad_checkpoint`` recomputes
packed rows' attention without their document ids: the loss is right and
the gradients are silently those of attention across documents.

The fix is explicit order, at the depth of one layer and one chunk:

* Each layer is a ``mx.custom_function`` whose vjp recomputes the layer from
  its saved input *made to depend on the incoming cotangent* (so the
  recompute cannot start before the backward reaches the layer), and whose
  input gradient is made to depend on the layer's parameter gradients (so
  those are computed, and their operands freed, before the backward moves
  on). The recompute re-enters the ``segments`` ids seen in the forward.
* The MLP, the only ``L x intermediate`` work, runs in chunks of tokens: a
  custom function whose forward keeps nothing but its input, each chunk
  ordered after the one before, and whose vjp recomputes one chunk at a time,
  each after the previous chunk's gradients. The layer's recompute never
  evaluates the MLP's forward (its output is not needed for the layer's own
  gradients), so the MLP runs twice per step, as with plain checkpointing,
  not three times.

So the working set of the step is one layer's full-length arrays (the
attention's ``q``, ``k``, ``v``, output and their gradients, the norms'
outputs: ``O(L x hidden)``, attention itself being ``O(L)`` with
mlx-flash's fused op) plus one chunk's MLP (``O(chunk x intermediate)``).
The chunk size ``auto`` makes a chunk's MLP intermediate about as large as
one hidden-state array, and leaves an MLP whole while its intermediate is
small (``AUTO_MIN_BYTES``).

Changing the model is reversible and keeps its parameter tree (adapters save
under the same names): each changed layer and MLP gets a subclass of its own
class, and ``restore()`` puts the original classes back.
"""

from contextlib import contextmanager, nullcontext
from typing import Callable, List, Optional, Union

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten, tree_unflatten

from . import documents

#: The smallest ``auto`` chunk: below it per-op overhead costs more than the
#: memory saved is worth.
MIN_AUTO_CHUNK = 256

#: ``auto`` leaves an MLP whole while its intermediate for the whole batch
#: (``B x L x intermediate`` float32) is at most this: below it chunking
#: saves little and costs a recompute of the MLP's forward.
AUTO_MIN_BYTES = 64 << 20

#: Attribute names of the position-wise feed-forward block in mlx-lm layers.
_MLP_NAMES = ("mlp", "feed_forward", "block_sparse_moe")

_subclasses = {}


def _bounded_class(cls: type, call: Callable) -> type:
    """A subclass of ``cls`` whose ``__call__`` is ``call`` (one per class)."""
    key = (cls, call)
    if key not in _subclasses:
        _subclasses[key] = type(cls.__name__, (cls,), {"__call__": call, "_bounded_base": cls})
    return _subclasses[key]


def _segments(ids):
    return documents.segments(ids) if ids is not None else nullcontext()


def _flat_params(module: nn.Module):
    """``(keys, arrays)`` of the module's trainable parameters."""
    flat = tree_flatten(module.trainable_parameters())
    return [k for k, _ in flat], [v for _, v in flat]


def _set_params(module: nn.Module, keys: List[str], arrays: List[mx.array]) -> None:
    if keys:
        module.update(tree_unflatten(list(zip(keys, arrays))))


def _as_list(x):
    return list(x) if isinstance(x, (list, tuple)) else [x]


def _checkpointed_layer_call(self, x, *args, **kwargs):
    """A layer's forward whose backward recomputes it in order (see the
    module docstring). Calls with a KV cache run the layer as it is."""
    base = type(self)._bounded_base.__call__
    cache = kwargs.get("cache", args[1] if len(args) > 1 else None)
    if cache is not None:
        return base(self, x, *args, **kwargs)
    ids = documents.current()
    keys, params = _flat_params(self)
    # Array arguments (a dense mask) are primals of the custom function, so
    # it stays pure; anything else (strings, None) is closed over.
    positions = [i for i, a in enumerate(args) if isinstance(a, mx.array)]
    names = [k for k, a in kwargs.items() if isinstance(a, mx.array)]
    n_params = len(params)

    def run(*primals):
        p = primals[:n_params]
        x_in = primals[n_params]
        extra = primals[n_params + 1 :]
        call_args, call_kwargs = list(args), dict(kwargs)
        for i, a in zip(positions, extra[: len(positions)]):
            call_args[i] = a
        for k, a in zip(names, extra[len(positions) :]):
            call_kwargs[k] = a
        _, saved = _flat_params(self)
        _set_params(self, keys, p)
        try:
            with _segments(ids):
                return base(self, x_in, *call_args, **call_kwargs)
        finally:
            _set_params(self, keys, saved)

    layer = mx.custom_function(run)

    @layer.vjp
    def layer_vjp(primals, cotangent, output):
        primals = list(primals)
        cotangent = cotangent[0] if isinstance(cotangent, (list, tuple)) else cotangent
        # The recompute may not start before the backward reaches this layer.
        primals[n_params] = mx.depends(primals[n_params], cotangent)
        _, grads = mx.vjp(run, primals, [cotangent])
        grads = list(grads)
        if n_params:
            # The parameter gradients (and so their operands' lifetime) end
            # before the next layer down starts its recompute.
            grads[n_params] = mx.depends(grads[n_params], grads[:n_params])
        return tuple(grads)

    extra = [args[i] for i in positions] + [kwargs[k] for k in names]
    return layer(*params, x, *extra)


def chunk_size(chunk_tokens: Union[int, str, None], length: int, hidden: int, intermediate: Optional[int],
               batch: int = 1) -> int:
    """Tokens per MLP chunk for rows of ``length`` tokens; ``length`` means
    no chunking.

    ``"auto"`` (or None): no chunking while ``batch x length x
    intermediate`` float32 values fit in ``AUTO_MIN_BYTES``; otherwise the
    largest power of two at most ``length * hidden / intermediate`` (a
    chunk's intermediate then holds about as many values as one ``(length,
    hidden)`` array), at least ``MIN_AUTO_CHUNK``. 0: no chunking. An int:
    that many tokens.
    """
    if chunk_tokens == 0:
        return length
    if chunk_tokens in (None, "auto"):
        if not intermediate or batch * length * intermediate * 4 <= AUTO_MIN_BYTES:
            return length
        target = max(MIN_AUTO_CHUNK, length * hidden // intermediate)
        chunk = 1 << (target.bit_length() - 1)
        return min(chunk, length)
    if not isinstance(chunk_tokens, int) or isinstance(chunk_tokens, bool) or chunk_tokens < 0:
        raise ValueError(f"[bound_activations] chunk_tokens must be 'auto', 0 or a positive int, got {chunk_tokens!r}")
    return min(chunk_tokens, length)


def _chunked_mlp_call(self, x):
    """The MLP over chunks of tokens, each recomputed alone in the backward.

    ``x``: ``(..., L, hidden)``; chunks split the ``L`` axis.
    """
    base = type(self)._bounded_base.__call__
    length = x.shape[-2] if x.ndim >= 2 else 1
    batch = x.size // (length * x.shape[-1]) if x.ndim >= 2 else 1
    chunk = chunk_size(self._chunk_tokens, length, x.shape[-1], _intermediate(self), batch)
    if x.ndim < 2 or chunk >= length:
        return base(self, x)
    keys, params = _flat_params(self)
    n_params = len(params)
    spans = [(s, min(s + chunk, length)) for s in range(0, length, chunk)]

    def run_chunk(*primals):
        _, saved = _flat_params(self)
        _set_params(self, keys, primals[:n_params])
        try:
            return base(self, primals[n_params])
        finally:
            _set_params(self, keys, saved)

    def forward(*primals):
        p, x_in = primals[:n_params], primals[n_params]
        outs = []
        for start, stop in spans:
            x_c = x_in[..., start:stop, :]
            if outs:
                # Chunk by chunk: otherwise the scheduler may compute every
                # chunk's intermediates before any is consumed.
                x_c = mx.depends(x_c, outs[-1])
            outs.append(run_chunk(*p, x_c))
        return mx.concatenate(outs, axis=-2)

    mlp = mx.custom_function(forward)

    @mlp.vjp
    def mlp_vjp(primals, cotangent, output):
        p, x_in = list(primals[:n_params]), primals[n_params]
        dy = cotangent[0] if isinstance(cotangent, (list, tuple)) else cotangent
        d_params, d_x, after = None, [], None
        for start, stop in spans:
            x_c = x_in[..., start:stop, :]
            if after is not None:
                x_c = mx.depends(x_c, after)
            _, grads = mx.vjp(run_chunk, p + [x_c], [dy[..., start:stop, :]])
            grads = list(grads)
            if d_params is None:
                d_params = grads[:n_params]
            else:
                d_params = [a + b for a, b in zip(d_params, grads[:n_params])]
            d_x.append(grads[n_params])
            after = d_params + [grads[n_params]]
        return tuple(d_params) + (mx.concatenate(d_x, axis=-2),)

    return mlp(*params, x)


def _intermediate(mlp: nn.Module) -> Optional[int]:
    """The widest output of the MLP's linear layers (its intermediate size)."""
    if "_intermediate_size" in mlp.__dict__:
        return mlp.__dict__["_intermediate_size"]
    widest = None
    for _, m in mlp.named_modules():
        w = getattr(m, "weight", None) if isinstance(m, nn.Module) else None
        if isinstance(w, mx.array) and w.ndim >= 2:
            rows = w.shape[-2]
            widest = rows if widest is None else max(widest, rows)
    mlp.__dict__["_intermediate_size"] = widest
    return widest


def _layers(model: nn.Module):
    for holder in (model, getattr(model, "model", None), getattr(model, "language_model", None)):
        if holder is None:
            continue
        layers = getattr(holder, "layers", None)
        if isinstance(layers, (list, tuple)) and layers:
            return layers
        inner = getattr(holder, "model", None)
        if inner is not None and isinstance(getattr(inner, "layers", None), (list, tuple)):
            return inner.layers
    raise ValueError(f"[bound_activations] cannot find the transformer layers of model type {type(model).__module__}")


def bound_activations(
    model: nn.Module,
    *,
    checkpoint: bool = True,
    chunk_tokens: Union[int, str, None] = "auto",
) -> Callable[[], None]:
    """Bound a training step's activations, in place; returns ``restore()``.

    Args:
        model: an mlx-lm causal LM (its ``layers`` found under the model or
            its ``model`` attribute).
        checkpoint: recompute every layer in its own backward, in order,
            saving only its input.
        chunk_tokens: tokens per MLP chunk: ``"auto"`` (see ``chunk_size``),
            0 (no chunking) or a positive int.

    Calls with a KV cache (generation) run the layers unchanged. Packed rows
    keep their ``mlx_flash.segments`` ids through the recompute.
    """
    if chunk_tokens not in (None, "auto"):
        chunk_size(chunk_tokens, 1, 1, 1)  # validates
    changed = []
    for layer in _layers(model):
        if chunk_tokens != 0:
            for name in _MLP_NAMES:
                mlp = getattr(layer, name, None)
                if isinstance(mlp, nn.Module):
                    changed.append((mlp, type(mlp)))
                    mlp.__class__ = _bounded_class(type(mlp), _chunked_mlp_call)
                    mlp.__dict__["_chunk_tokens"] = chunk_tokens
                    break
        if checkpoint:
            changed.append((layer, type(layer)))
            layer.__class__ = _bounded_class(type(layer), _checkpointed_layer_call)

    def restore():
        for module, cls in reversed(changed):
            module.__class__ = cls
            module.__dict__.pop("_chunk_tokens", None)
            module.__dict__.pop("_intermediate_size", None)
        changed.clear()

    return restore


@contextmanager
def bounded(model: nn.Module, *, checkpoint: bool = False, chunk_tokens: Union[int, str, None] = "auto"):
    """``bound_activations`` for the duration of a block (nothing to do when
    neither checkpointing nor chunking is asked for)."""
    restore = None
    if checkpoint or chunk_tokens != 0:
        restore = bound_activations(model, checkpoint=checkpoint, chunk_tokens=chunk_tokens)
    try:
        yield
    finally:
        if restore is not None:
            restore()
