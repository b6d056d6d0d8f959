"""``python -m mlx_flash.plan MODEL``: what a LoRA training step needs, before it runs.

    python -m mlx_flash.plan qwen2.5-1.5b --seq 65536 --mac 16
    python -m mlx_flash.plan recipes/tinyllama-1.1b-lora.yaml --json
    python -m mlx_flash.plan qwen3-8b --memory 32GB --machines 2

The planner reads a model's ``config.json`` (or a GGUF header; no weight is
loaded) and predicts one step's peak memory per component, for stock
mlx-lm and for mlx-flash's options stacked one on the other, and the longest
row that fits a budget. The fine-tune prints the plan before it loads a
model and refuses a run predicted not to fit; ``python -m mlx_flash.doctor
--plan`` prints it for a recipe.

The model
---------

Notation: ``T = B x L / N`` tokens per rank (``B`` rows of ``L`` tokens,
``N`` context-parallel ranks), ``k`` the blocks the backward passes through
(those with LoRA), ``H`` hidden size, ``I`` the MLP's width per token
(``experts_per_token x`` one expert's for a mixture of experts), ``A =
(Hq + 2 Hkv) x D`` the query, key and value features, ``V`` the vocabulary,
``s`` the activations' bytes per element, ``c_*`` fitted coefficients.

    peak = weights + lora + saved + layer + attention + loss

- ``weights``: as stored. Unquantized, parameters x dtype bytes; quantized,
  each linear weight (embedding and head included) ``bits / 8`` bytes plus
  a scale and a bias of ``s`` bytes per group; norms and biases in the
  dtype. A model folder's own ``.safetensors`` sizes replace the count; a
  GGUF's tensor table is read as MLX loads it (Q4_0/Q4_1/Q8_0 quantized in
  groups of 32, other types as float16).
- ``lora``: ``16`` bytes per LoRA parameter (float32 value, gradient and
  Adam's two moments); ``rank x (in + out)`` parameters per linear layer of
  each adapted block, as mlx-lm's ``linear_to_lora_layers`` places them.
- ``saved`` (the activations kept for the backward):
  without checkpointing ``k x T x s x (c_h H + c_i I + c_a A)``; with it
  the layer inputs ``k x T x H x s`` plus ``c_ki k x T x I x s`` (MLX's
  lazy backward keeps LoRA gradients' operands of several layers alive:
  see mlx_flash.step).
- ``layer`` (one layer's working set): ``c_w T (H + I) s`` without
  checkpointing; ``T s (c_wh H + c_wi I + c_wa A)`` with mlx-lm's
  checkpointing; with bounded activations, one layer's full-length
  attention arrays plus one MLP chunk: ``T s (c_wh H + c_wa A) + c_ci B x
  chunk x I x s`` (``chunk`` as step.py's ``auto`` picks it).
- ``attention``: dense (stock mlx-lm on packed rows, windows): ``c_s x k x
  B x Hq x (L / N) x L x s`` without checkpointing, exactly one layer's
  ``B x Hq x (L / N) x L x s`` with it (the layer being differentiated
  holds its softmax); fused: the float32 log-sum-exp, ``k x T x Hq x 4``.
- ``loss``: full logits (mlx-lm's ``default_loss``) ``c_v x T x V x s``;
  logit-free (mlx_flash.losses) ``c_lt x 4 T (H + 1)`` (the float32
  log-sum-exp and gradient direction per token) plus ``c_lc`` x four
  float32 chunks of ``min(T, 512) x min(V, 8192)`` logits.
- Context parallelism (Llama 3's): every per-token term counts ``L / N``
  tokens; each layer also holds the whole row's gathered keys and values,
  ``B x L x 2 Hkv D x s`` (saved per layer without checkpointing).

Counted exactly, not fitted: the weights, the LoRA state, the layer inputs
a checkpointed step keeps, the fused log-sum-exp and one layer's dense
scores under checkpointing. The other coefficients are fitted per family
(no checkpointing; mlx-lm's ``grad_checkpoint``; mlx_flash.step's bounded
activations), non-negative, to make the largest relative error over the
measured steps committed under ``bench/`` small (``python -m
mlx_flash.plan.fit``), and stored in ``coefficients.json``
(``bench/linux-cpu-plan/report.md`` lists them with every cell); a family
no measurement covers keeps the design values in ``memory.DESIGN``. A
fitted coefficient of 0 means the measurements did not need that term:
MLX's peak is the largest live set at one moment, not the sum, so terms
that are alive at different moments share one coefficient.

Where it is an approximation
----------------------------

- The peak is a sum; MLX's real peak is the largest set of arrays alive at
  once, which its evaluation order decides. The fitted coefficients absorb
  that order at the measured shapes; far from them (other ratios of ``H`` to
  ``I``, other vocabularies) the error grows.
- Measurements are float32 on MLX's CPU backend. bfloat16 and quantized
  models are extrapolated by bytes: every activation term scales with
  ``s``, the LoRA state stays float32. Metal's allocator rounds and caches
  buffers differently; the CPU's fused attention is mlx-flash's blockwise
  path where a Mac runs the Metal kernels (both ``O(L)``).
- Dense masks: the boolean ``L x L`` mask itself (1 byte per pair, shared by
  the layers) is not counted beside the scores.
- Mixtures of experts count the experts a token runs as one wide MLP;
  router and gathered-expert buffers are not modelled.
- A Mac's default budget for a named RAM size (``--mac``) is about two
  thirds of it up to 32 GB and three quarters above; the Mac itself reports
  the exact ``max_recommended_working_set_size``, which the planner uses when
  it runs there. Raise it with ``sudo sysctl iogpu.wired_limit_mb=<MB>``.
"""

from .memory import MODES, Options, Prediction, Setup, max_length, predict
from .models import Geometry, PlanError, resolve
from .report import Plan, make_plan, summary_line

__all__ = [
    "MODES", "Options", "Prediction", "Setup", "max_length", "predict",
    "Geometry", "PlanError", "resolve", "Plan", "make_plan", "summary_line",
]  # fmt: skip
