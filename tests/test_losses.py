"""mlx_flash.losses: the linear cross-entropy against full-logit
``nn.losses.cross_entropy``, every head kind, and mlx-lm models split into
final hidden states and head."""

from dataclasses import replace
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten, tree_map
from mlx_lm.tuner.lora import LoRAEmbedding, LoRALinear
from mlx_lm.tuner.trainer import default_loss
from mlx_lm.tuner.utils import linear_to_lora_layers

from conftest import assert_close
from mlx_flash.finetune.builtin import model_classes
from mlx_flash.losses import LinearHead, chunked_loss, final_hidden, head_from_module, head_of, linear_cross_entropy


def close(actual, expected, rtol, what=""):
    """Largest difference at most ``rtol`` times the largest magnitude."""
    assert_close(actual, expected, (0.0, rtol), what)


def _random_lora(module):
    # mlx-lm starts lora_b at zero, which would make its gradient test trivial.
    module.lora_b = 0.1 * mx.random.normal(module.lora_b.shape)
    return module


def make_head(kind, D, V, dtype=mx.float32):
    """A head module of ``kind`` and whether the model calls it ``as_linear``."""
    if kind in ("dense", "frozen", "softcap"):
        m = nn.Linear(D, V, bias=False)
    elif kind == "biased":
        m = nn.Linear(D, V, bias=True)
        m.bias = mx.random.normal((V,))
    elif kind == "tied":
        return nn.Embedding(V, D), True
    elif kind == "quantized":
        m = nn.Linear(D, V, bias=True)
        m.bias = mx.random.normal((V,))
        m = nn.QuantizedLinear.from_linear(m, group_size=64, bits=4)
    elif kind == "quantized_embedding":
        return nn.QuantizedEmbedding.from_embedding(nn.Embedding(V, D), group_size=64, bits=4), True
    elif kind == "lora":
        base = nn.Linear(D, V, bias=True)
        base.bias = mx.random.normal((V,))
        base.freeze()
        m = _random_lora(LoRALinear.from_base(base, r=4, scale=2.0, dropout=0.0))
    elif kind == "lora_quantized":
        base = nn.QuantizedLinear.from_linear(nn.Linear(D, V, bias=False), group_size=64, bits=4)
        m = _random_lora(LoRALinear.from_base(base, r=4, scale=2.0, dropout=0.0))
    elif kind == "lora_embedding":
        base = nn.Embedding(V, D)
        base.freeze()
        return _random_lora(LoRAEmbedding.from_base(base, r=4, scale=2.0, dropout=0.0)), True
    else:
        raise AssertionError(kind)
    if kind == "frozen":
        m.freeze()
    return m, False


HEAD_KINDS = ["dense", "frozen", "biased", "tied", "quantized", "quantized_embedding", "lora", "lora_quantized",
              "lora_embedding", "softcap"]  # fmt: skip


class Toy(nn.Module):
    """Hidden states as a parameter and a head: the gradients of both are
    what a model's loss hands back."""

    def __init__(self, hidden, head, as_linear, multiplier=1.0, softcap=None):
        super().__init__()
        self.hidden = hidden
        self.head = head
        self.as_linear = as_linear
        self.multiplier = multiplier
        self.softcap = softcap

    def logits(self):
        z = self.head.as_linear(self.hidden) if self.as_linear else self.head(self.hidden)
        z = z * self.multiplier
        if self.softcap is not None:
            z = mx.tanh(z / self.softcap) * self.softcap
        return z


def full_loss(toy, targets, mask):
    # The oracle: full logits, mlx's own cross-entropy.
    logits = toy.logits().astype(mx.float32)
    safe = mx.where((targets >= 0) & (targets < logits.shape[-1]), targets, 0)
    return (nn.losses.cross_entropy(logits, safe) * mask).sum()


def chunked(toy, targets, mask, **chunks):
    head = replace(head_from_module(toy.head), multiplier=toy.multiplier, softcap=toy.softcap)
    return linear_cross_entropy(toy.hidden, head, targets, mask, **chunks).sum()


def problem(kind, B, L, D, V, dtype=mx.float32, seed=0, float_mask=False):
    mx.random.seed(seed)
    head, as_linear = make_head(kind, D, V)
    if dtype != mx.float32:
        head.set_dtype(dtype)
    extra = dict(multiplier=0.7, softcap=5.0) if kind == "softcap" else {}
    toy = Toy(mx.random.normal((B, L, D)).astype(dtype), head, as_linear, **extra)
    targets = mx.random.randint(0, V, (B, L))
    if float_mask:
        mask = mx.random.uniform(shape=(B, L))
    else:
        mask = (mx.random.uniform(shape=(B, L)) > 0.25).astype(mx.float32)
    # Ignored positions carry ids a tokenizer's padding would: -100 and V.
    ignored = mx.random.uniform(shape=(B, L)) < 0.2
    targets = mx.where(ignored, mx.where(mx.random.uniform(shape=(B, L)) < 0.5, -100, V), targets)
    mask = mx.where(ignored, 0.0, mask)
    return toy, targets, mask


def grads_of(fn, toy, *args):
    value, grads = nn.value_and_grad(toy, fn)(toy, *args)
    return value, dict(tree_flatten(grads))


SHAPES = [
    # B, L, D, V, token_chunk, vocab_chunk: vocabularies not a multiple of the chunk
    (2, 9, 64, 203, 5, 32),
    (1, 17, 64, 97, 16, 97),
    (3, 4, 128, 1000, 7, 128),
]


@pytest.mark.parametrize("kind", HEAD_KINDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_loss_and_gradients_equal_full_logits(kind, shape):
    B, L, D, V, tc, vc = shape
    toy, targets, mask = problem(kind, B, L, D, V, float_mask=shape[0] == 3)
    expected, eg = grads_of(full_loss, toy, targets, mask)
    got, gg = grads_of(partial(chunked, token_chunk=tc, vocab_chunk=vc), toy, targets, mask)
    close(got, expected, 1e-5, "loss")
    assert set(gg) == set(eg) and "hidden" in gg
    if kind in ("dense", "biased", "tied"):
        assert {"head.weight"} <= set(gg)
    if kind.startswith("lora"):
        assert {"head.lora_a", "head.lora_b"} <= set(gg)
    for name in eg:
        close(gg[name], eg[name], 1e-5, name)


@pytest.mark.parametrize("kind", ["frozen", "quantized_embedding", "softcap"])
def test_recompute_saves_only_the_log_sum_exp_and_agrees(kind):
    toy, targets, mask = problem(kind, 2, 9, 64, 203, seed=11)
    expected, eg = grads_of(full_loss, toy, targets, mask)
    got, gg = grads_of(partial(chunked, token_chunk=4, vocab_chunk=64, recompute=True), toy, targets, mask)
    close(got, expected, 1e-5, "loss")
    for name in eg:
        close(gg[name], eg[name], 1e-5, name)


def test_per_token_losses_zero_where_masked_or_ignored():
    toy, targets, mask = problem("biased", 2, 11, 64, 150, seed=3)
    head = head_from_module(toy.head)
    per = linear_cross_entropy(toy.hidden, head, targets, mask, token_chunk=4, vocab_chunk=64)
    logits = toy.logits()
    valid = (targets >= 0) & (targets < 150)
    expected = nn.losses.cross_entropy(logits, mx.where(valid, targets, 0)) * mask
    assert per.shape == (2, 11) and per.dtype == mx.float32
    close(per, expected, 1e-5, "per-token")
    assert (np.array(per)[np.array(mask) == 0] == 0).all()
    # An out-of-range target is ignored even where the mask keeps it.
    ones = linear_cross_entropy(toy.hidden, head, targets, None, token_chunk=4, vocab_chunk=64)
    assert (np.array(ones)[~np.array(valid)] == 0).all()
    g = mx.grad(lambda h: linear_cross_entropy(h, head, targets, None, vocab_chunk=64).sum())(toy.hidden)
    assert (np.abs(np.array(g))[~np.array(valid)] == 0).all()


@pytest.mark.parametrize("kind", ["frozen", "dense", "lora", "quantized"])
def test_under_compile_and_value_and_grad(kind):
    toy, targets, mask = problem(kind, 2, 9, 64, 203, seed=5)
    loss_and_grad = nn.value_and_grad(toy, partial(chunked, token_chunk=4, vocab_chunk=64))

    @partial(mx.compile, inputs=toy.state, outputs=toy.state)
    def step(targets, mask):
        return loss_and_grad(toy, targets, mask)

    expected, eg = grads_of(full_loss, toy, targets, mask)
    for _ in range(2):  # the second call runs the traced graph
        got, gg = step(targets, mask)
        gg = dict(tree_flatten(gg))
        close(got, expected, 1e-5, "loss")
        for name in eg:
            close(gg[name], eg[name], 1e-5, name)
    # A pure function of arrays, compiled, with other targets on the second call.
    w = toy.head.weight if kind in ("frozen", "dense") else None
    if w is not None:
        f = mx.compile(mx.value_and_grad(
            lambda h, w, t: linear_cross_entropy(h, LinearHead(w), t, vocab_chunk=50).sum(), argnums=(0, 1)))
        ref = mx.value_and_grad(lambda h, w, t: nn.losses.cross_entropy(h @ w.T, t).sum(), argnums=(0, 1))
        for t in (targets % 203, (targets * 7 + 1) % 203):
            (v1, (dh1, dw1)), (v2, (dh2, dw2)) = f(toy.hidden, w, t), ref(toy.hidden, w, t)
            close(v1, v2, 1e-5, "loss")
            close(dh1, dh2, 1e-5, "hidden")
            close(dw1, dw2, 1e-5, "weight")


@pytest.mark.parametrize("dtype, rtol", [(mx.bfloat16, 2e-2), (mx.float16, 4e-3)], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("kind", ["frozen", "dense", "lora"])
def test_half_precision_at_the_dtypes_tolerance(kind, dtype, rtol):
    toy, targets, mask = problem(kind, 2, 13, 64, 300, dtype=dtype, seed=7)
    # The oracle reduces the same half-precision logits in float32; the
    # gradients are compared with autodiff through the half-precision model.
    expected, eg = grads_of(full_loss, toy, targets, mask)
    got, gg = grads_of(partial(chunked, token_chunk=8, vocab_chunk=128), toy, targets, mask)
    close(got, expected, rtol / 4, "loss")
    for name in eg:
        assert gg[name].dtype == eg[name].dtype, name
        close(gg[name], eg[name], rtol, name)


def test_bad_arguments_are_one_line_errors():
    head = head_from_module(nn.Linear(8, 10))
    with pytest.raises(ValueError, match="hidden size 6 does not match"):
        linear_cross_entropy(mx.zeros((1, 2, 6)), head, mx.zeros((1, 2), mx.int32))
    with pytest.raises(ValueError, match=r"targets \(B, L\)"):
        linear_cross_entropy(mx.zeros((1, 2, 8)), head, mx.zeros((2,), mx.int32))
    with pytest.raises(ValueError, match="DoRA"):
        from mlx_lm.tuner.dora import DoRALinear

        head_from_module(DoRALinear.from_base(nn.Linear(8, 10), r=2))


def test_peak_memory_stays_far_below_the_logits():
    """Counted, not timed: the gradient of the loss at N=2048, V=16384 with
    full logits needs several 128 MiB logit-sized arrays; the chunked loss
    holds 1 MiB chunks, a few in flight at once."""
    N, D, V = 2048, 64, 16384
    mx.random.seed(0)
    h = mx.random.normal((1, N, D))
    w = 0.1 * mx.random.normal((V, D))
    t = mx.random.randint(0, V, (1, N))
    mx.eval(h, w, t)

    def peak(fn):
        mx.synchronize()
        mx.clear_cache()
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        mx.eval(fn())
        return mx.get_peak_memory() - base

    full = peak(lambda: mx.grad(lambda h: nn.losses.cross_entropy(h @ w.T, t).sum())(h))
    head = head_from_module(nn.Linear(D, V, bias=False))
    frozen = replace(head, weight=w, trainable=frozenset())
    trainable = replace(head, weight=w)
    chunks = dict(token_chunk=128, vocab_chunk=2048)
    ours = peak(lambda: mx.grad(lambda h: linear_cross_entropy(h, frozen, t, **chunks).sum())(h))
    both = peak(lambda: mx.grad(
        lambda h, w: linear_cross_entropy(h, replace(trainable, weight=w), t, **chunks).sum(), argnums=(0, 1))(h, w))
    logits = 4 * N * V
    assert full >= 2 * logits
    assert ours < 0.1 * logits, (ours, logits)
    # A trainable head adds its weight-sized gradient, and nothing logit-sized.
    assert both < 0.1 * logits + 2 * w.nbytes, (both, logits)


# --- mlx-lm models ---

BASE = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
            rms_norm_eps=1e-5, vocab_size=211, rope_theta=10000.0, head_dim=16, max_position_embeddings=256)  # fmt: skip
FAMILIES = {
    "llama": dict(tie_word_embeddings=False),
    "qwen2": dict(tie_word_embeddings=True),
    "qwen3": dict(tie_word_embeddings=False),
    "mistral": dict(),
    "gemma2": dict(query_pre_attn_scalar=16, final_logit_softcapping=3.0, attn_logit_softcapping=50.0),
    "gemma3_text": dict(query_pre_attn_scalar=16, sliding_window=4, sliding_window_pattern=2),
    "gemma3": dict(vocab_size=211, text_config=dict(BASE, model_type="gemma3_text", query_pre_attn_scalar=16,
                                                    sliding_window=4, sliding_window_pattern=2)),
    "phi3": dict(),
    "cohere": dict(logit_scale=0.5, layer_norm_eps=1e-5),
    "granite": dict(logits_scaling=4.0, embedding_multiplier=1.0, attention_multiplier=1.0, residual_multiplier=1.0,
                    tie_word_embeddings=True, attention_bias=False, mlp_bias=False),
    # Its backbone takes the token ids by keyword.
    "gptj": dict(n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=128, layer_norm_epsilon=1e-5),
    "gpt_oss": dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=4,
                    layer_types=["sliding_attention", "full_attention"]),
}  # fmt: skip


def build(model_type, seed=0, **extra):
    config = dict(BASE, model_type=model_type, **FAMILIES.get(model_type, {}), **extra)
    model_class, args_class = model_classes(config)
    mx.random.seed(seed)
    model = model_class(args_class.from_dict(config))
    mx.eval(model.parameters())
    return model


def batch_and_lengths(seed=1):
    mx.random.seed(seed)
    batch = mx.random.randint(0, 211, (2, 13))
    lengths = mx.array([[1, 12], [4, 9]])  # (prompt offset, length) as mlx-lm's batches give them
    return batch, lengths


@pytest.mark.parametrize("model_type", sorted(FAMILIES))
def test_chunked_loss_equals_default_loss(model_type):
    model = build(model_type)
    batch, lengths = batch_and_lengths()
    (got, n1), (expected, n2) = chunked_loss(model, batch, lengths), default_loss(model, batch, lengths)
    assert n1.item() == n2.item() == 18
    close(got, expected, 1e-5, model_type)
    head = head_of(model)
    if model_type == "gemma2":
        assert head.softcap == 3.0
    if model_type in ("cohere", "granite"):
        assert head.multiplier == 0.25 if model_type == "granite" else head.multiplier == 0.5
    # final_hidden + head is the model's logits.
    inputs = batch[:, :-1]
    close(head(final_hidden(model, inputs)), model(inputs), 1e-5, "logits")


def lora_model(model_type, keys, quantize=False):
    model = build(model_type)
    if quantize:
        nn.quantize(model, group_size=64, bits=4)
    model.freeze()
    mx.random.seed(2)
    linear_to_lora_layers(model, 2, {"rank": 4, "scale": 2.0, "dropout": 0.0, "keys": keys})
    for _, m in model.named_modules():
        if isinstance(m, (LoRALinear, LoRAEmbedding)):
            _random_lora(m)
    mx.eval(model.parameters())
    return model


@pytest.mark.parametrize(
    "model_type, keys, quantize",
    [
        ("llama", ["self_attn.q_proj", "mlp.down_proj", "lm_head"], False),
        ("qwen2", ["self_attn.v_proj", "model.embed_tokens"], False),
        ("llama", ["self_attn.q_proj", "lm_head"], True),
        ("qwen2", ["self_attn.q_proj"], True),
    ],
    ids=["llama-lora-head", "qwen2-tied-lora-embedding", "llama-4bit-lora-head", "qwen2-4bit-tied"],
)
def test_lora_gradients_equal_default_loss(model_type, keys, quantize):
    model = lora_model(model_type, keys, quantize)
    batch, lengths = batch_and_lengths()
    trainable = {k for k, _ in tree_flatten(model.trainable_parameters())}
    if "lm_head" in keys:
        assert {"lm_head.lora_a", "lm_head.lora_b"} <= trainable
    (expected, _), eg = nn.value_and_grad(model, default_loss)(model, batch, lengths)
    loss_and_grad = nn.value_and_grad(model, chunked_loss)
    state = [model.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def step(batch, lengths):
        return loss_and_grad(model, batch, lengths)

    eg = dict(tree_flatten(eg))
    for fn in (partial(loss_and_grad, model), step):
        (got, _), gg = fn(batch, lengths)
        gg = dict(tree_flatten(gg))
        assert set(gg) == set(eg) == trainable
        close(got, expected, 1e-5, "loss")
        for name in eg:
            close(gg[name], eg[name], 2e-5 if quantize else 1e-5, name)


def test_unsplittable_model_is_refused_in_one_line():
    config = dict(BASE, model_type="minicpm", dim_model_base=16, scale_emb=1.0, scale_depth=1.0)
    model_class, args_class = model_classes(config)
    model = model_class(args_class.from_dict(config))
    for fn in (head_of, lambda m: final_hidden(m, mx.zeros((1, 2), mx.int32))):
        with pytest.raises(ValueError) as info:
            fn(model)
        message = str(info.value)
        assert "\n" not in message and "'minicpm'" in message and "loss: full" in message

    class Odd(nn.Module):
        model_type = "odd"

        def __init__(self):
            super().__init__()
            self.model = nn.Embedding(10, 8)
            self.lm_head = nn.Linear(8, 10)

        def __call__(self, inputs):
            return mx.softmax(self.lm_head(self.model(inputs)), axis=-1)

    with pytest.raises(ValueError, match="model type 'odd' cannot be split"):
        head_of(Odd())

    # A head that computes something else than its base class is refused too.
    class Doubled(nn.Linear):
        def __call__(self, x):
            return 2 * super().__call__(x)

    model = build("llama")
    model.lm_head = Doubled(64, 211, bias=False)
    with pytest.raises(ValueError, match="model type 'llama' has an output head of type Doubled"):
        head_of(model)


# --- the fine-tune's recipe key `loss` ---


def test_recipe_key_loss_is_validated():
    from finetune_runs import QUICKSTART, cli
    from mlx_flash.finetune.config import RecipeError, load_recipe

    assert load_recipe(str(QUICKSTART)).loss == "auto"
    assert load_recipe(str(QUICKSTART), ["loss=chunked"]).loss == "chunked"
    with pytest.raises(RecipeError, match=r"^loss: unknown value 'chunky' \(choose from auto, full, chunked\)$"):
        load_recipe(str(QUICKSTART), ["loss=chunky"])
    with pytest.raises(RecipeError, match=r"^loss: chunked and context_parallel > 1 do not combine"):
        load_recipe(str(QUICKSTART), ["loss=chunked", "context_parallel=2"])
    result = cli(QUICKSTART, "--set", "loss=3", "--check")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines() == ["mlx_flash.finetune: error: loss: expected a string, got 3 (int)"]


def test_auto_threshold_and_refusal():
    from mlx_flash.finetune import loss_choice

    model = build("qwen2")
    full, packed = object(), object()
    # 211 tokens of vocabulary: 4 * B * L * 211 bytes against 256 MiB.
    small = loss_choice.choose("auto", model, 1, 1024, False, full, packed)
    assert small[0] == "full" and small[1] is full and small[2].startswith("auto: logits")
    big = loss_choice.choose("auto", model, 8, 65536, False, full, packed)
    assert big[0] == "chunked" and big[1] is chunked_loss
    assert loss_choice.choose("chunked", model, 1, 8, True, full, packed)[1] is loss_choice.chunked_packed_loss
    assert loss_choice.choose("full", model, 8, 65536, True, full, packed)[:2] == ("full", packed)
    config = dict(BASE, model_type="minicpm", dim_model_base=16, scale_emb=1.0, scale_depth=1.0)
    model_class, args_class = model_classes(config)
    odd = model_class(args_class.from_dict(config))
    assert loss_choice.choose("auto", odd, 8, 65536, False, full, packed)[0] == "full"
    with pytest.raises(ValueError, match="model type 'minicpm' cannot be split"):
        loss_choice.choose("chunked", odd, 8, 65536, False, full, packed)


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
def test_finetune_records_the_loss_and_chunked_trains_like_full(packed, tmp_path, monkeypatch):
    import json

    from finetune_runs import FAST, QUICKSTART
    from mlx_flash.finetune.__main__ import main

    monkeypatch.setenv("MLX_FLASH_CACHE", str(tmp_path / "cache"))
    runs = {}
    for loss in ("full", "chunked", "auto"):
        out = tmp_path / loss
        code = main([str(QUICKSTART), *FAST, "--set", "iters=3", "--set", "steps_per_eval=3", "--set", "val_batches=1",
                     "--set", f"pack_sequences={str(packed).lower()}", "--set", "attention.compare=[]",
                     "--set", "attention.variant=manual", "--set", f"loss={loss}", "--out", str(out)])  # fmt: skip
        assert code == 0
        summary = json.loads((out / "manual" / "summary.json").read_text())
        records = [json.loads(line) for line in (out / "manual" / "metrics.jsonl").read_text().splitlines()]
        runs[loss] = summary, [r["loss"] for r in records]
        assert summary["peak_memory_bytes"] > 0
    assert runs["full"][0]["loss"] == "full" and runs["chunked"][0]["loss"] == "chunked"
    # The built-in model's byte vocabulary keeps its logits far below the threshold.
    assert runs["auto"][0]["loss"] == "full" and runs["auto"][0]["loss_reason"].startswith("auto: logits")
    np.testing.assert_allclose(runs["chunked"][1], runs["full"][1], rtol=1e-4)
    np.testing.assert_allclose(runs["chunked"][0]["final_val_loss"], runs["full"][0]["final_val_loss"], rtol=1e-4)


def test_loss_alone_measurement_runs_both_paths():
    from mlx_flash.bench import loss as bench_loss

    result = bench_loss.compare(1024, 16384, 64, progress=lambda s: None)
    full, ours = result["full"], result["chunked"]
    assert result["same_loss_and_gradient"]
    # 64 MiB of logits a copy against 16 MiB chunks.
    assert full["peak_above_inputs_bytes"] >= 2 * 4 * 1024 * 16384
    assert ours["peak_above_inputs_bytes"] < full["peak_above_inputs_bytes"] / 2
    assert result["peak_ratio"] == ours["peak_above_inputs_bytes"] / full["peak_above_inputs_bytes"]
    assert result["peak_pass"] == (result["peak_ratio"] <= 0.03)
