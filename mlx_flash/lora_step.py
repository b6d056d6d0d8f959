"""One LoRA training step of an mlx-lm model with random weights, measured.

What ``python -m mlx_flash.bench --step`` and the planner's fitted cells
(``python -m mlx_flash.plan.measure``) both run: a model built from a
``config.json`` dictionary (``build``), LoRA on every linear layer of its
layers (``add_lora``), and one forward, backward and optimizer update whose
wall time and ``mx.get_peak_memory()`` are taken around it alone
(``timed_step``). What goes into the step (loss, attention, checkpointing)
is each caller's.
"""

import time
from contextlib import ExitStack
from typing import Callable, Optional, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

#: LoRA on every linear layer: rank 8 unless said, mlx-lm's scale 20, no dropout.
LORA_SCALE = 20.0


def build(config: dict, layers: int, seed: int = 0, vocab: Optional[int] = None,
          quantization: Optional[dict] = None) -> nn.Module:
    """The model of ``config`` cut to its first ``layers`` layers, with
    random weights drawn after ``mx.random.seed(seed)``; ``vocab`` replaces
    the vocabulary size; ``quantization`` (``group_size``, ``bits``)
    quantizes the weights. Evaluated."""
    from .finetune.builtin import model_classes

    config = dict(config)
    config["num_hidden_layers"] = layers
    if "layer_types" in config:
        config["layer_types"] = config["layer_types"][:layers]
    if vocab:
        config["vocab_size"] = vocab
    model_class, args_class = model_classes(config)
    mx.random.seed(seed)
    model = model_class(args_class.from_dict(config))
    if quantization:
        nn.quantize(model, group_size=quantization["group_size"], bits=quantization["bits"])
    mx.eval(model.parameters())
    return model


def add_lora(model: nn.Module, layers: int, rank: int = 8) -> int:
    """Freeze ``model`` and put LoRA of ``rank`` on every linear layer of its
    ``layers`` layers (mlx-lm's ``linear_to_lora_layers``); the bytes of the
    frozen weights as stored."""
    from mlx_lm.tuner.utils import linear_to_lora_layers

    model.freeze()
    linear_to_lora_layers(model, layers, {"rank": rank, "scale": LORA_SCALE, "dropout": 0.0})
    mx.eval(model.parameters())
    trainable = {k for k, _ in tree_flatten(model.trainable_parameters())}
    return sum(v.nbytes for k, v in tree_flatten(model.parameters()) if k not in trainable)


def timed_step(model: nn.Module, loss_and_grad: Callable, optimizer, inputs: Sequence[mx.array],
               contexts: Sequence = ()) -> Tuple[mx.array, float, int]:
    """``(loss, seconds, peak bytes)`` of one step: ``loss_and_grad(model,
    *inputs)`` (returning ``((loss, tokens), grads)``, as
    ``nn.value_and_grad`` of mlx-lm's losses does) and the optimizer's
    update, evaluated inside ``contexts`` (entered in order). The inputs are evaluated and the
    cache and peak reset first, so the peak is the step's."""
    mx.eval(*inputs)
    mx.clear_cache()
    mx.reset_peak_memory()
    tic = time.perf_counter()
    with ExitStack() as stack:
        for context in contexts:
            stack.enter_context(context)
        (value, ntoks), grad = loss_and_grad(model, *inputs)
        optimizer.update(model, grad)
        mx.eval(value, ntoks, model.parameters(), optimizer.state)
    wall = time.perf_counter() - tic
    return value, wall, mx.get_peak_memory()
