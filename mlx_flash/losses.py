"""Linear cross-entropy that never holds the ``(N, V)`` logits.

``linear_cross_entropy(hidden, head, targets, mask)`` returns the per-token
loss ``logsumexp(h W^T) - (h W^T)[target]`` of a language model's output
head without building the logits: it streams over token chunks (``T``
rows of ``hidden``) and vocabulary chunks (``C`` rows of the head's weight)
inside an ``mx.custom_function`` with its own backward, so that no more than
a few ``T x C`` chunks of logits exist at any time. ``head_of(model)`` and
``final_hidden(model, inputs)`` split an mlx-lm causal LM into the two
inputs, and ``chunked_loss`` is a drop-in for mlx-lm's ``default_loss``.

Memory. With ``N = B * L`` tokens, ``D`` the hidden size and ``V`` the
vocabulary, the function keeps alive between its forward and backward:

- the float32 log-sum-exp of every token (``4 N`` bytes), the only thing
  saved from the forward;
- for a frozen head (the usual LoRA fine-tune), the float32 gradient
  direction ``softmax(z) W - W[target]`` of every token (``4 N D`` bytes,
  the size of the hidden states in float32): the forward accumulates it
  with the log-sum-exp (FlashAttention's online rescaling, with the head's
  weight in the role of both keys and values), so the backward is one
  scaling per token and the logits are computed once, as in the full path.
  A trainable head (dense fine-tune, LoRA or a bias on the head) instead
  recomputes each chunk's logits in the backward, because its gradient sums
  over tokens with the incoming per-token weights; ``recompute=True`` takes
  that path for a frozen head too and holds only the log-sum-exp, for one
  more matrix product;

and while it runs, one chunk of logits and the few same-shape temporaries
that follow it (``T x C`` float32 each), plus the weight-sized gradient of a
trainable head. Each chunk waits (``mx.depends``) for the previous chunk's
result, because MLX builds its evaluation order level by level from the
outputs and would otherwise compute a chunk's logits, a few operations below
the running result, several chunks early and hold them. What remains is
MLX's own lookahead: the host allocates an operation's output when it
dispatches it and lets about ten operations run ahead of the stream, so
about five chunks (80 MiB at the default sizes; counted, not estimated) are
allocated at the peak, whatever ``N`` and ``V`` are. Nothing calls
``mx.eval``, so the function works under ``mx.compile`` and
``nn.value_and_grad``.

Chunk sizes. ``C = 8192`` vocabulary rows (a Qwen2.5 vocabulary of 151,936
is 19 chunks) and ``T = 2**22 // C = 512`` tokens make one chunk of logits
``T * C`` float32 = 16 MiB; the matrix products are then ``512 x 8192 x D``,
large enough for BLAS and Metal to run at full speed, while the working set
stays near 100 MiB whatever ``L`` and ``V`` are (at ``L = 8192`` and Qwen2.5's
vocabulary the full logits are 4.6 GiB a copy). Both are arguments
(``token_chunk``, ``vocab_chunk``); small vocabularies use one chunk.

Exactness: each chunk's logits are computed as the head computes them (the
head's dtype, bias and LoRA term included), then raised to float32; the
log-sum-exp and the gradient arithmetic are float32. Against
``nn.losses.cross_entropy`` on the full logits the loss and gradients agree
to float32 rounding, and in bfloat16/float16 to that dtype's rounding of the
logits (the full path on the CPU reduces in the logits' dtype; this
function in float32). Targets outside ``[0, V)`` count as ignored: their
loss and gradient are zero.

Logit soft-capping (``cap * tanh(z / cap)``, Gemma's
``final_logit_softcapping``) and a constant logit multiplier (Cohere's
``logit_scale``, Granite's ``1 / logits_scaling``) are carried by the head
and applied exactly, inside the chunks.
"""

from dataclasses import dataclass, field, replace
from typing import Callable, FrozenSet, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn

VOCAB_CHUNK = 8192
TILE_ELEMENTS = 1 << 22


@dataclass(frozen=True)
class LinearHead:
    """An output head ``logits = softcap(multiplier * (x W^T + b + s (u Q)))``.

    ``weight`` is ``(V, D)``, or for a quantized head the packed ``(V, D *
    bits / 32)`` uint32 array with ``scales`` and ``biases`` (``None`` for
    modes without biases) as ``mx.quantize`` returns them. ``bias`` is
    ``(V,)``. A LoRA term on the head is ``lora_scale * (lora_in(x) @
    lora_out)`` with ``lora_in: (D, r)`` applied to ``lora_dropout(x)`` and
    ``lora_out: (r, V)``. ``trainable`` names the arrays whose gradient is
    wanted (``weight``, ``bias``, ``lora_in``, ``lora_out``; all by default,
    and ``head_of`` sets it from the module's frozen state): the others get
    a zero gradient, never computed, and a head with none of them gets the
    one-pass backward. A quantized weight never gets a gradient.
    """

    weight: mx.array
    bias: Optional[mx.array] = None
    scales: Optional[mx.array] = None
    biases: Optional[mx.array] = None
    group_size: int = 64
    bits: int = 4
    mode: str = "affine"
    lora_in: Optional[mx.array] = None
    lora_out: Optional[mx.array] = None
    lora_scale: float = 1.0
    lora_dropout: Optional[Callable[[mx.array], mx.array]] = None
    multiplier: float = 1.0
    softcap: Optional[float] = None
    trainable: FrozenSet[str] = field(default_factory=lambda: frozenset({"weight", "bias", "lora_in", "lora_out"}))

    @property
    def quantized(self) -> bool:
        return self.scales is not None

    @property
    def vocab_size(self) -> int:
        return self.weight.shape[0]

    @property
    def dims(self) -> int:
        if self.quantized:
            return self.weight.shape[1] * 32 // self.bits
        return self.weight.shape[1]

    def __call__(self, x: mx.array) -> mx.array:
        """The full logits ``(..., V)``, as the model computes them (for
        checks and small inputs; the loss never calls this)."""
        if self.quantized:
            z = mx.quantized_matmul(
                x, self.weight, self.scales, self.biases, transpose=True,
                group_size=self.group_size, bits=self.bits, mode=self.mode,
            )
        else:
            z = x @ self.weight.T
        if self.bias is not None:
            z = z + self.bias
        if self.lora_out is not None:
            xd = self.lora_dropout(x) if self.lora_dropout is not None else x
            z = z + (self.lora_scale * ((xd @ self.lora_in) @ self.lora_out)).astype(z.dtype)
        if self.multiplier != 1.0:
            z = z * self.multiplier
        if self.softcap is not None:
            z = mx.tanh(z / self.softcap) * self.softcap
        return z


def _chunks(n: int, size: int):
    return [(s, min(s + size, n)) for s in range(0, n, size)]


class _Tiles:
    """The per-chunk arithmetic shared by the forward and both backwards.

    Arrays are the custom function's primals: ``x: (N, D)``, ``u: (N, r)``
    (the LoRA input projection, or None), ``w`` (and quantization arrays),
    ``b: (V,)`` or None, ``q: (r, V)`` or None.
    """

    def __init__(self, head: LinearHead, w, scales, qbiases, b, q):
        self.head = head
        self.w, self.scales, self.qbiases, self.b, self.q = w, scales, qbiases, b, q

    def logits(self, xt, ut, v0, v1):
        """Float32 logits ``(T, C)`` of tokens ``xt`` for vocabulary rows
        ``v0:v1``, the multiplier and soft-cap applied."""
        h = self.head
        if h.quantized:
            z = mx.quantized_matmul(
                xt, self.w[v0:v1], self.scales[v0:v1],
                None if self.qbiases is None else self.qbiases[v0:v1],
                transpose=True, group_size=h.group_size, bits=h.bits, mode=h.mode,
            )
        else:
            z = xt @ self.w[v0:v1].T
        if self.b is not None:
            z = z + self.b[v0:v1]
        if self.q is not None:
            z = z + (h.lora_scale * (ut @ self.q[:, v0:v1])).astype(z.dtype)
        y = z if z.dtype == mx.float32 else z.astype(mx.float32)
        if h.multiplier != 1.0:
            y = y * h.multiplier
        if h.softcap is not None:
            y = mx.tanh(y / h.softcap) * h.softcap
        return y

    def chain_rule(self, dy, y):
        """d/dz from d/dy for the multiplier and soft-cap (float32)."""
        h = self.head
        if h.softcap is not None:
            t = y / h.softcap
            dy = dy * (1.0 - t * t)
        if h.multiplier != 1.0:
            dy = dy * h.multiplier
        return dy

    def back(self, dz, v0, v1):
        """``dz @ W[v0:v1]``: ``(T, C) -> (T, D)``."""
        h = self.head
        if h.quantized:
            return mx.quantized_matmul(
                dz, self.w[v0:v1], self.scales[v0:v1],
                None if self.qbiases is None else self.qbiases[v0:v1],
                transpose=False, group_size=h.group_size, bits=h.bits, mode=h.mode,
            )
        return dz @ self.w[v0:v1]

    def rows(self, idx):
        """The head's weight rows ``W[idx]`` as ``(T, D)`` in the compute dtype."""
        h = self.head
        if h.quantized:
            return mx.dequantize(
                self.w[idx], self.scales[idx], None if self.qbiases is None else self.qbiases[idx],
                group_size=h.group_size, bits=h.bits, mode=h.mode,
            )
        return self.w[idx]


def _pick(y, local, width):
    """``y[i, local[i]]`` where ``0 <= local[i] < width``, else 0."""
    inside = (local >= 0) & (local < width)
    got = mx.take_along_axis(y, mx.clip(local, 0, width - 1)[:, None], axis=1)[:, 0]
    return mx.where(inside, got, 0.0)


def _after(xt, ut, state):
    """``xt`` and ``ut`` made to wait for ``state``, the previous chunk's result.

    MLX evaluates a graph level by level from its outputs, so a chunk's
    logits, a few operations below the running result, would otherwise be
    computed several chunks early and held until their turn; depending on the
    previous chunk's result makes the chunks strictly one after the other.
    """
    if state is None:
        return xt, ut
    if ut is None:
        return mx.depends(xt, state), None
    return tuple(mx.depends([xt, ut], state))


def _token_chunk(x, u, targets, t0: int, t1: int, prev):
    """Rows ``t0:t1`` of ``x``, ``u`` (or None) and ``targets``, with ``x``'s
    made to wait for ``prev``, the previous token chunk's result, so token
    chunks run one after the other, not interleaved."""
    xt = x[t0:t1] if prev is None else mx.depends(x[t0:t1], prev)
    return xt, None if u is None else u[t0:t1], targets[t0:t1]


def _make(head: LinearHead, n_tokens: int, token_chunk: int, vocab_chunk: int, recompute: bool):
    """The custom function ``(x, u, targets, w, scales, qbiases, b, q) ->
    (ce, lse[, direction])`` for one head and chunking: ``x: (N, D)``,
    ``targets: (N,)``, per-token ``ce`` and float32 ``lse: (N,)``, and for a
    frozen head the float32 gradient direction ``(N, D)``."""
    V = head.vocab_size
    tchunks = _chunks(n_tokens, token_chunk)
    vchunks = _chunks(V, vocab_chunk)
    lora = head.lora_out is not None
    # Only the frozen-head case can fold the backward into the forward: a
    # trainable head's gradient is a sum over tokens weighted by the
    # incoming cotangents, which the forward does not know.
    wants = set(head.trainable)
    if head.quantized:
        wants.discard("weight")
    if head.bias is None:
        wants.discard("bias")
    if not lora:
        wants -= {"lora_in", "lora_out"}
    one_pass = not wants and not lora and not recompute

    def unpack(args):
        x, u, targets, w, scales, qbiases, b, q = args
        return x, u, targets, _Tiles(head, w, scales, qbiases, b, q)

    def forward(*args):
        x, u, targets, tiles = unpack(args)
        lses, picks, grads = [], [], []
        prev = None
        for t0, t1 in tchunks:
            xt, ut, tt = _token_chunk(x, u, targets, t0, t1, prev)
            m = s = tgt = acc = None
            for v0, v1 in vchunks:
                y = tiles.logits(*_after(xt, ut, s), v0, v1)
                picked = _pick(y, tt - v0, v1 - v0)
                tgt = picked if tgt is None else tgt + picked
                m_new = y.max(axis=1) if m is None else mx.maximum(m, y.max(axis=1))
                # The target's logit is read before the exponentials, so
                # that the logits can be freed (or reused) by them.
                m_new = mx.depends(m_new, tgt)
                e = mx.exp(y - m_new[:, None])
                if m is None:
                    s = e.sum(axis=1)
                else:
                    alpha = mx.exp(m - m_new)
                    s = s * alpha + e.sum(axis=1)
                if one_pass:
                    de = tiles.chain_rule(e, y).astype(x.dtype)
                    step = tiles.back(de, v0, v1).astype(mx.float32)
                    acc = step if acc is None else acc * alpha[:, None] + step
                m = m_new
                s = mx.depends(s, [tgt] if acc is None else [tgt, acc])
            lse = m + mx.log(s)
            lses.append(lse)
            picks.append(tgt)
            prev = lse
            if one_pass:
                valid = (tt >= 0) & (tt < V)
                idx = mx.clip(tt, 0, V - 1)
                yt = tgt
                ct = tiles.chain_rule(mx.ones_like(yt), yt)
                g = acc / s[:, None] - ct[:, None] * tiles.rows(idx).astype(mx.float32)
                grads.append(mx.where(valid[:, None], g, 0.0))
        lse = mx.concatenate(lses)
        tgt = mx.concatenate(picks)
        valid = (targets >= 0) & (targets < V)
        ce = mx.where(valid, lse - tgt, 0.0)
        if one_pass:
            return ce, lse, mx.concatenate(grads)
        return ce, lse

    def zeros_for(a):
        return None if a is None else mx.zeros_like(a)

    def vjp(primals, cotangents, outputs):
        x, u, targets, tiles = unpack(primals)
        cot = cotangents[0].astype(mx.float32)
        valid = (targets >= 0) & (targets < V)
        g_all = mx.where(valid, cot, 0.0)
        w, scales, qbiases, b, q = primals[3:]
        if one_pass:
            dx = (g_all[:, None] * outputs[2]).astype(x.dtype)
            return [dx, zeros_for(u), mx.zeros_like(targets), mx.zeros_like(w),
                    zeros_for(scales), zeros_for(qbiases), zeros_for(b), zeros_for(q)]
        lse = outputs[1]
        need_w = "weight" in wants
        need_b = "bias" in wants
        dw = [None] * len(vchunks)
        db = [None] * len(vchunks)
        dq = [None] * len(vchunks)
        dxs, dus = [], []
        prev = None
        for t0, t1 in tchunks:
            xt, ut, tt = _token_chunk(x, u, targets, t0, t1, prev)
            gt = g_all[t0:t1][:, None]
            lt = lse[t0:t1][:, None]
            dxt = dut = None
            for k, (v0, v1) in enumerate(vchunks):
                y = tiles.logits(*_after(xt, ut, dxt), v0, v1)
                p = mx.exp(y - lt)
                hit = (tt - v0)[:, None] == mx.arange(v1 - v0)[None, :]
                dy = gt * (p - hit.astype(mx.float32))
                dz = tiles.chain_rule(dy, y).astype(x.dtype)
                step = tiles.back(dz, v0, v1).astype(mx.float32)
                dxt = step if dxt is None else dxt + step
                side = []
                if lora:
                    su = head.lora_scale * (dz @ q[:, v0:v1].T).astype(mx.float32)
                    dut = su if dut is None else dut + su
                    sq = head.lora_scale * (ut.T @ dz).astype(mx.float32)
                    dq[k] = sq if dq[k] is None else dq[k] + sq
                    side += [dut, dq[k]]
                if need_w:
                    sw = (dz.T @ xt).astype(mx.float32)
                    dw[k] = sw if dw[k] is None else dw[k] + sw
                    side.append(dw[k])
                if need_b:
                    sb = dz.astype(mx.float32).sum(axis=0)
                    db[k] = sb if db[k] is None else db[k] + sb
                    side.append(db[k])
                if side:
                    # Every use of this chunk's logits happens before the
                    # next chunk starts, so only one chunk is alive.
                    dxt = mx.depends(dxt, side)
            dxs.append(dxt)
            dus.append(dut)
            prev = dxt
        dx = mx.concatenate(dxs).astype(x.dtype)
        du = mx.concatenate(dus).astype(u.dtype) if lora else zeros_for(u)
        dw_full = mx.concatenate(dw).astype(w.dtype) if need_w else mx.zeros_like(w)
        db_full = (mx.concatenate(db).astype(b.dtype) if need_b else zeros_for(b))
        dq_full = mx.concatenate(dq, axis=1).astype(q.dtype) if lora else zeros_for(q)
        return [dx, du, mx.zeros_like(targets), dw_full, zeros_for(scales),
                zeros_for(qbiases), db_full, dq_full]

    fn = mx.custom_function(forward)
    fn.vjp(vjp)
    return fn


def linear_cross_entropy(
    hidden: mx.array,
    head: LinearHead,
    targets: mx.array,
    mask: Optional[mx.array] = None,
    *,
    token_chunk: Optional[int] = None,
    vocab_chunk: Optional[int] = None,
    recompute: bool = False,
) -> mx.array:
    """Per-token cross-entropy of ``head(hidden)`` against ``targets``.

    Args:
        hidden: ``(B, L, D)`` final hidden states.
        head: the output head (``head_of(model)``).
        targets: ``(B, L)`` integer token ids; ids outside ``[0, V)`` are ignored.
        mask: ``(B, L)`` boolean or float weights (None: all ones).
        token_chunk, vocab_chunk: chunk sizes (None: see the module docstring).
        recompute: save only the log-sum-exp even for a frozen head, and
            recompute the logits in the backward: ``4 N D`` bytes less
            between forward and backward for one more matrix product.

    Returns:
        ``(B, L)`` float32 losses, zero where the mask is zero, equal to
        ``nn.losses.cross_entropy(head(hidden), targets) * mask``.
    """
    if hidden.ndim != 3 or targets.shape != hidden.shape[:2]:
        raise ValueError(
            f"linear_cross_entropy: hidden must be (B, L, D) and targets (B, L), got {hidden.shape} and {targets.shape}"
        )
    if hidden.shape[-1] != head.dims:
        raise ValueError(f"linear_cross_entropy: hidden size {hidden.shape[-1]} does not match the head's {head.dims}")
    if not mx.issubdtype(targets.dtype, mx.integer):
        raise ValueError(f"linear_cross_entropy: targets must be integers, got {targets.dtype}")
    if mask is not None and mask.shape != targets.shape:
        raise ValueError(f"linear_cross_entropy: mask shape {mask.shape} does not match targets {targets.shape}")
    B, L, D = hidden.shape
    N = B * L
    V = head.vocab_size
    if N == 0:
        return mx.zeros((B, L), mx.float32)
    vocab_chunk = min(vocab_chunk or VOCAB_CHUNK, V)
    token_chunk = min(token_chunk or max(1, TILE_ELEMENTS // vocab_chunk), N)
    if vocab_chunk < 1 or token_chunk < 1:
        raise ValueError("linear_cross_entropy: token_chunk and vocab_chunk must be positive")
    x = hidden.reshape(N, D)
    u = None
    if head.lora_out is not None:
        xd = head.lora_dropout(x) if head.lora_dropout is not None else x
        u = xd @ head.lora_in
    fn = _make(head, N, token_chunk, vocab_chunk, recompute)
    out = fn(x, u, targets.reshape(N), head.weight, head.scales, head.biases, head.bias, head.lora_out)
    ce = out[0].reshape(B, L)
    if mask is not None:
        ce = ce * mask.astype(mx.float32)
    return ce


# --- Splitting an mlx-lm causal LM into its final hidden states and head ---
#
# mlx-lm models compute logits in ``Model.__call__``: a backbone call
# (``self.model(inputs, cache)``), then a head (``self.lm_head(out)`` or the
# tied ``self.model.embed_tokens.as_linear(out)``, chosen by
# ``tie_word_embeddings``), then for some families a constant multiplier or a
# soft-cap. Rather than a list of families, the split reads that method's
# source and follows it symbolically: conditions and constants are evaluated
# on the model, and a statement it does not understand refuses the model.


class _Refuse(Exception):
    pass


@dataclass(frozen=True)
class _Logits:
    head: Tuple[str, ...]  # attribute path of the head module from the text model
    as_linear: bool  # embedding.as_linear (or x @ embedding.weight.T)
    multiplier: float = 1.0
    softcap: Optional[float] = None
    tanh_of: Optional[float] = None  # value is tanh(logits / c), awaiting "* c"


@dataclass(frozen=True)
class _Split:
    lm: nn.Module
    backbone: str
    keyword: Optional[str]
    logits: _Logits


_HIDDEN = "hidden"


def _refusal(model, why: str) -> ValueError:
    """The one-line refusal, naming the model type (``model`` or its name)."""
    name = model if isinstance(model, str) else _model_type(model)
    return ValueError(f"chunked loss: model type '{name}' {why}; use loss: full")


def _bare(lg) -> bool:
    """Logits with no soft-cap yet, so one may follow."""
    return isinstance(lg, _Logits) and lg.softcap is None and lg.tanh_of is None


def _model_type(model) -> str:
    for obj in (model, getattr(model, "args", None), getattr(model, "config", None)):
        mt = getattr(obj, "model_type", None)
        if isinstance(mt, str):
            return mt
    return type(model).__module__.rsplit(".", 1)[-1]


def _call_ast(cls):
    import ast
    import inspect
    import textwrap

    cached = _call_ast.cache.get(cls)
    if cached is None:
        try:
            src = textwrap.dedent(inspect.getsource(cls.__call__))
        except (OSError, TypeError) as e:
            raise _Refuse(f"no source for {cls.__name__}.__call__") from e
        fn = ast.parse(src).body[0]
        if not isinstance(fn, ast.FunctionDef):
            raise _Refuse(f"{cls.__name__}.__call__ is not a plain method")
        cached = fn
        _call_ast.cache[cls] = fn
    return cached


_call_ast.cache = {}


class _Follow:
    """Evaluates ``Model.__call__`` symbolically on one model instance."""

    def __init__(self, lm: nn.Module, fn):
        import ast

        self.ast = ast
        self.lm = lm
        self.fn = fn
        args = [a.arg for a in fn.args.args]
        self.inputs = args[1] if len(args) > 1 else None
        self.env = {}
        self.backbone = None
        self.keyword = None  # the backbone takes the token ids by this keyword (None: first positional)
        self.delegate = None

    def fail(self, node):
        raise _Refuse(f"'{self.ast.unparse(node)[:60]}' in {type(self.lm).__name__}.__call__")

    def path(self, node) -> Optional[Tuple[str, ...]]:
        """``self.a.b`` as ``("a", "b")``; None for anything else."""
        ast = self.ast
        parts = []
        while isinstance(node, ast.Attribute):
            parts.append(node.attr)
            node = node.value
        if isinstance(node, ast.Name) and node.id == "self":
            return tuple(reversed(parts))
        return None

    def resolve(self, path):
        obj = self.lm
        for p in path:
            obj = obj[p] if isinstance(obj, dict) and p in obj else getattr(obj, p)
        return obj

    def const(self, node):
        """A Python value computed from the model's attributes, or _Refuse."""
        ast = self.ast
        if isinstance(node, ast.Constant):
            return node.value
        p = self.path(node)
        if p is not None:
            try:
                return self.resolve(p)
            except (AttributeError, KeyError):
                return None
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
            return not self.const(node.operand)
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Mult, ast.Div, ast.Add, ast.Sub)):
            a, b = self.const(node.left), self.const(node.right)
            if not all(isinstance(v, (int, float)) for v in (a, b)):
                self.fail(node)
            if isinstance(node.op, ast.Div):
                return a / b
            return {ast.Mult: a * b, ast.Add: a + b, ast.Sub: a - b}[type(node.op)]
        if isinstance(node, ast.Compare) and len(node.ops) == 1:
            op, right = node.ops[0], node.comparators[0]
            if isinstance(op, (ast.Is, ast.IsNot)) and isinstance(right, ast.Constant) and right.value is None:
                v = self.const(node.left)
                return (v is None) == isinstance(op, ast.Is)
            if isinstance(op, (ast.In, ast.NotIn)) and isinstance(node.left, ast.Constant) and self.path(right) == ():
                return (node.left.value in self.lm) == isinstance(op, ast.In)
        self.fail(node)

    def value(self, node):
        ast = self.ast
        if isinstance(node, ast.Name):
            if node.id in self.env:
                return self.env[node.id]
            self.fail(node)
        if isinstance(node, ast.Call):
            fp = self.path(node.func)
            args = node.args
            if fp is not None and fp and fp[-1] == "language_model" and len(fp) == 1:
                self.delegate = "language_model"
                return "delegate"
            given = [k.arg for k in node.keywords if isinstance(k.value, ast.Name) and k.value.id == self.inputs]
            if args and isinstance(args[0], ast.Name) and args[0].id == self.inputs:
                given = [None]
            if fp is not None and len(fp) == 1 and given:
                if self.backbone is not None:
                    self.fail(node)
                self.backbone = fp[0]
                self.keyword = given[0]
                return _HIDDEN
            if fp is not None and args and len(args) == 1 and not node.keywords:
                arg = self.value(args[0])
                if arg != _HIDDEN:
                    self.fail(node)
                if fp[-1] == "as_linear":
                    return _Logits(fp[:-1], True)
                return _Logits(fp, False)
            if isinstance(node.func, ast.Attribute) and isinstance(node.func.value, ast.Name):
                # mx.tanh(logits / c)
                if node.func.value.id == "mx" and node.func.attr == "tanh" and len(args) == 1:
                    inner = args[0]
                    if isinstance(inner, ast.BinOp) and isinstance(inner.op, ast.Div):
                        lg = self.value(inner.left)
                        c = self.const(inner.right)
                        if _bare(lg) and isinstance(c, (int, float)):
                            return replace(lg, tanh_of=float(c))
            if isinstance(node.func, ast.Name) and node.func.id == "logit_softcap" and len(args) == 2:
                c = self.const(args[0])
                lg = self.value(args[1])
                if _bare(lg) and isinstance(c, (int, float)):
                    return replace(lg, softcap=float(c))
            self.fail(node)
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.MatMult):
            # h @ self.<embedding>.weight.T
            lhs = self.value(node.left)
            r = node.right
            if lhs == _HIDDEN and isinstance(r, ast.Attribute) and r.attr == "T":
                p = self.path(r.value)
                if p and p[-1] == "weight":
                    return _Logits(p[:-1], True)
            self.fail(node)
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Mult, ast.Div)):
            lg = self.value(node.left)
            if not isinstance(lg, _Logits):
                self.fail(node)
            c = self.const(node.right)
            if not isinstance(c, (int, float)) or isinstance(c, bool):
                self.fail(node)
            c = float(c)
            if isinstance(node.op, ast.Mult):
                if lg.tanh_of is not None:
                    if c != lg.tanh_of:
                        self.fail(node)
                    return replace(lg, softcap=c, tanh_of=None)
                if lg.softcap is not None:
                    self.fail(node)
                return replace(lg, multiplier=lg.multiplier * c)
            if lg.softcap is not None or lg.tanh_of is not None:
                self.fail(node)
            return replace(lg, multiplier=lg.multiplier / c)
        self.fail(node)

    def run(self, body):
        ast = self.ast
        for st in body:
            if isinstance(st, ast.Expr) and isinstance(st.value, ast.Constant):
                continue
            if isinstance(st, ast.If):
                branch = st.body if self.const(st.test) else st.orelse
                out = self.run(branch)
                if out is not None:
                    return out
                continue
            if isinstance(st, ast.Assign) and len(st.targets) == 1 and isinstance(st.targets[0], ast.Name):
                self.env[st.targets[0].id] = self.value(st.value)
                continue
            if isinstance(st, ast.Return) and st.value is not None:
                return self.value(st.value)
            self.fail(st)
        return None


def _split(model: nn.Module) -> _Split:
    lm = model
    for _ in range(4):
        try:
            follow = _Follow(lm, _call_ast(type(lm)))
            out = follow.run(follow.fn.body)
        except _Refuse as e:
            raise _refusal(model, f"cannot be split into hidden states and a linear head ({e})") from None
        if out == "delegate":
            lm = lm.language_model
            continue
        if not isinstance(out, _Logits) or out.tanh_of is not None or follow.backbone is None:
            raise _refusal(model, "cannot be split into hidden states and a linear head")
        return _Split(lm, follow.backbone, follow.keyword, out)
    raise _refusal(model, "cannot be split: its wrappers nest too deep")


def _trainable(module: nn.Module):
    from mlx.utils import tree_flatten

    return {k for k, _ in tree_flatten(module.trainable_parameters())}


def _plain(module: nn.Module, bases) -> bool:
    # A subclass that changes what the head computes is not this head.
    for base in bases:
        if isinstance(module, base):
            method = "as_linear" if issubclass(base, (nn.Embedding, nn.QuantizedEmbedding)) else "__call__"
            return getattr(type(module), method) is getattr(base, method)
    return False


def _base_head(module: nn.Module, model_type: str, tr, prefix: str) -> dict:
    if not _plain(module, (nn.QuantizedLinear, nn.QuantizedEmbedding, nn.Linear, nn.Embedding)):
        raise _refusal(model_type, f"has an output head of type {type(module).__name__}, which it does not support")
    if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
        return dict(
            weight=module["weight"], scales=module["scales"], biases=module.get("biases"),
            bias=module.get("bias") if isinstance(module, nn.QuantizedLinear) else None,
            group_size=module.group_size, bits=module.bits, mode=getattr(module, "mode", "affine"),
            trainable={n for n in ("bias",) if prefix + n in tr},
        )
    if isinstance(module, (nn.Linear, nn.Embedding)):
        bias = module.get("bias") if isinstance(module, nn.Linear) else None
        return dict(weight=module["weight"], bias=bias, trainable={n for n in ("weight", "bias") if prefix + n in tr})
    raise _refusal(model_type, f"has an output head of type {type(module).__name__}, which it does not support")


def head_from_module(module: nn.Module, model_type: str = "unknown") -> LinearHead:
    """The ``LinearHead`` of one head module: ``nn.Linear``, ``nn.Embedding``
    (its ``as_linear``), their quantized forms, or mlx-lm's ``LoRALinear`` /
    ``LoRAEmbedding`` around one of them. ``trainable`` follows the module's
    frozen state. Raises ``ValueError`` (one line) for anything else."""
    tr = _trainable(module)
    name = type(module).__name__
    if name.startswith("DoRA"):
        raise _refusal(model_type, "has DoRA on its output head, which the chunked loss does not support")
    if "lora_a" in module and "lora_b" in module and name in ("LoRALinear", "LoRAEmbedding"):
        if "linear" in module:
            kw = _base_head(module["linear"], model_type, tr, "linear.")
            lora_in, lora_out = module["lora_a"], module["lora_b"]
        elif "embedding" in module:
            kw = _base_head(module["embedding"], model_type, tr, "embedding.")
            lora_in, lora_out = module["lora_b"].T, module["lora_a"].T
        else:
            raise _refusal(model_type, f"has an output head of type {name}, which it does not support")
        dropout = getattr(module, "dropout", None)
        kw.update(
            lora_in=lora_in, lora_out=lora_out, lora_scale=float(module.scale),
            lora_dropout=dropout if isinstance(dropout, nn.Module) else None,
        )
        kw["trainable"] |= {n for n, k in (("lora_in", "lora_a"), ("lora_out", "lora_b")) if k in tr}
    else:
        kw = _base_head(module, model_type, tr, "")
    kw["trainable"] = frozenset(kw["trainable"])
    return LinearHead(**kw)


def head_of(model: nn.Module) -> LinearHead:
    """The output head of an mlx-lm causal LM, soft-cap and multiplier
    included, built from the model's current parameters.

    Raises ``ValueError`` (one line naming the model type) when the model's
    logits are not ``head(final_hidden(model, inputs))``.
    """
    split = _split(model)
    module = split.lm
    try:
        for p in split.logits.head:
            module = module[p] if isinstance(module, dict) and p in module else getattr(module, p)
    except AttributeError:
        raise _refusal(model, f"has no '{'.'.join(split.logits.head)}' head") from None
    if not isinstance(module, nn.Module):
        raise _refusal(model, "has a head that is not a module")
    head = head_from_module(module, _model_type(model))
    if split.logits.as_linear != (isinstance(module, (nn.Embedding, nn.QuantizedEmbedding)) or "embedding" in module):
        raise _refusal(model, "has a head that is not a linear map")
    return replace(head, multiplier=split.logits.multiplier, softcap=split.logits.softcap)


def final_hidden(model: nn.Module, inputs: mx.array) -> mx.array:
    """The final normed hidden states ``(B, L, D)`` the head reads, from
    ``inputs`` ``(B, L)`` token ids."""
    split = _split(model)
    backbone = getattr(split.lm, split.backbone)
    return backbone(inputs) if split.keyword is None else backbone(**{split.keyword: inputs})


def chunked_loss(model: nn.Module, batch: mx.array, lengths: mx.array):
    """Drop-in for ``mlx_lm.tuner.trainer.default_loss``: the mean next-token
    loss over the tokens ``lengths`` selects, and their count, without the
    logits."""
    inputs = batch[:, :-1]
    targets = batch[:, 1:]
    hidden = final_hidden(model, inputs)
    steps = mx.arange(1, targets.shape[1] + 1)
    mask = mx.logical_and(steps >= lengths[:, 0:1], steps <= lengths[:, 1:])
    ce = linear_cross_entropy(hidden, head_of(model), targets, mask)
    ntoks = mask.sum()
    return ce.sum() / ntoks, ntoks
