"""mlx-lm integration: patch(), unpatch(), patched(), is_patched(), mlx_flash.auto.

Tiny models are built from configs with the attention geometry of the real
ones (no download): TinyLlama-1.1B (llama, 32 query heads, 4 KV heads, head
dim 64) and Qwen2.5-1.5B (qwen2, 12 query heads, 2 KV heads, head dim 128,
q/k/v bias). The unpatched model, which runs MLX's own attention, is the
oracle for every comparison.
"""

import importlib
import json
import os
import subprocess
import sys
import textwrap

import mlx.core as mx
import mlx.nn as nn
import pytest
from mlx.utils import tree_flatten
from mlx_lm.generate import generate_step
from mlx_lm.models import base, gpt_oss, llama, qwen2
from mlx_lm.models.cache import QuantizedKVCache, RotatingKVCache, make_prompt_cache
from mlx_lm.tuner.utils import linear_to_lora_layers

import mlx_flash
from conftest import assert_close

patch_module = importlib.import_module("mlx_flash.patch")

ORIGINAL_SDPA = base.scaled_dot_product_attention
VOCAB = 128
SLIDING_WINDOW = 8


pytestmark = pytest.mark.usefixtures("unpatched")


def tinyllama(num_layers: int = 2) -> nn.Module:
    """TinyLlama attention geometry; the second layer uses a sliding window."""
    mx.random.seed(0)
    layer_types = ["full_attention", "sliding_attention"][:num_layers]
    args = llama.ModelArgs(
        model_type="llama",
        hidden_size=32 * 64,
        num_hidden_layers=num_layers,
        intermediate_size=64,
        num_attention_heads=32,
        num_key_value_heads=4,
        rms_norm_eps=1e-5,
        vocab_size=VOCAB,
        layer_types=layer_types,
        sliding_window=SLIDING_WINDOW,
        tie_word_embeddings=False,
    )
    model = llama.Model(args)
    mx.eval(model.parameters())
    return model


def tinyqwen(num_layers: int = 1) -> nn.Module:
    """Qwen2.5-1.5B attention geometry, q/k/v bias included."""
    mx.random.seed(1)
    args = qwen2.ModelArgs(
        model_type="qwen2",
        hidden_size=12 * 128,
        num_hidden_layers=num_layers,
        intermediate_size=64,
        num_attention_heads=12,
        num_key_value_heads=2,
        rms_norm_eps=1e-6,
        vocab_size=VOCAB,
    )
    model = qwen2.Model(args)
    # The biases start at zero; make them count.
    for layer in model.layers:
        for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
            proj.bias = 0.1 * mx.random.normal(proj.bias.shape)
    mx.eval(model.parameters())
    return model


MODELS = {"tinyllama": tinyllama, "tinyqwen": tinyqwen}


@pytest.fixture(scope="module", params=sorted(MODELS))
def model(request):
    return MODELS[request.param]()


def tokens(length: int, seed: int = 2) -> mx.array:
    return mx.random.randint(0, VOCAB, (1, length), key=mx.random.key(seed))


@pytest.fixture
def calls(monkeypatch):
    """Record every call the patched function makes to mlx-flash's op."""
    seen = []
    real = patch_module.flash_attention

    def counting(q, k, v, *, scale, mask=None, sinks=None, variant="auto", **structure):
        plan = mlx_flash.explain(q, k, v, mask=mask, sinks=sinks, variant=variant, **structure)
        seen.append(dict(q_len=q.shape[2], mask=mask, sinks=sinks, variant=variant, plan=plan, **structure))
        return real(q, k, v, scale=scale, mask=mask, sinks=sinks, variant=variant, **structure)

    monkeypatch.setattr(patch_module, "flash_attention", counting)
    return seen


#: Every element within 1e-4: at least as strict as ``mx.allclose`` at
#: ``atol=1e-4`` whatever its ``rtol``.
CLOSE = (1e-4, 0.0)


# -- state: patch, unpatch, patched, is_patched --------------------------------


def test_unpatch_restores_original_objects():
    from mlx_lm.models import deepseek_v41

    before = {m: m.scaled_dot_product_attention for m in (base, llama, qwen2, gpt_oss)}
    assert all(f is ORIGINAL_SDPA for f in before.values())
    assert deepseek_v41.mx is mx

    mlx_flash.patch()
    mlx_flash.patch("manual")  # twice, and switching variant, is harmless
    assert mlx_flash.is_patched()
    for module in before:
        assert module.scaled_dot_product_attention is patch_module.scaled_dot_product_attention
    # The module that calls mx.fast directly sees the proxy; mx.fast itself is untouched.
    assert deepseek_v41.mx is not mx
    assert deepseek_v41.mx.fast.scaled_dot_product_attention is not mx.fast.scaled_dot_product_attention
    assert deepseek_v41.mx.float32 is mx.float32
    state = mlx_flash.patch_state()
    assert state.active and state.variant == "manual"
    assert {"mlx_lm.models.base", "mlx_lm.models.llama", "mlx_lm.models.qwen2"} <= set(state.modules)
    assert state.direct == ("mlx_lm.models.deepseek_v41",)

    mlx_flash.unpatch()
    mlx_flash.unpatch()
    assert not mlx_flash.is_patched()
    for module, original in before.items():
        assert module.scaled_dot_product_attention is original
    assert deepseek_v41.mx is mx
    assert patch_module._hook not in sys.meta_path
    assert mlx_flash.patch_state().modules == ()


def test_patched_context_restores_previous_state():
    with mlx_flash.patched("blockwise"):
        assert mlx_flash.patch_state().variant == "blockwise"
    assert not mlx_flash.is_patched()
    assert llama.scaled_dot_product_attention is ORIGINAL_SDPA

    mlx_flash.patch("manual")
    with pytest.raises(RuntimeError):
        with mlx_flash.patched("blockwise"):
            assert mlx_flash.patch_state().variant == "blockwise"
            raise RuntimeError("inside the block")
    assert mlx_flash.is_patched() and mlx_flash.patch_state().variant == "manual"


def test_bad_variant_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown variant 'fast'"):
        mlx_flash.patch("fast")
    assert not mlx_flash.is_patched()
    assert llama.scaled_dot_product_attention is ORIGINAL_SDPA


def test_reference_kept_while_patched_is_original_after_unpatch(calls):
    mlx_flash.patch()
    kept = llama.scaled_dot_product_attention
    mlx_flash.unpatch()
    q = mx.random.normal((1, 4, 12, 16))
    k = mx.random.normal((1, 2, 12, 16))
    out = kept(q, k, k, None, scale=0.25, mask="causal")
    assert calls == []
    assert_close(out, mx.fast.scaled_dot_product_attention(q, k, k, scale=0.25, mask="causal"), CLOSE)


# -- the patched function in the models ----------------------------------------


def test_forward_calls_the_patched_function_and_logits_match(model, calls):
    x = tokens(24)
    expected = model(x)
    assert calls == []

    with mlx_flash.patched():
        got = model(x)
    mx.eval(got)
    assert_close(got, expected, CLOSE)

    # One call per layer, each with the mask mlx-lm built for it.
    assert len(calls) == len(model.layers)
    assert all(c["q_len"] == 24 and c["variant"] == "auto" for c in calls)
    assert all(c["plan"].implementation != "mlx" for c in calls)
    assert calls[0]["mask"] == "causal" and "window" not in calls[0]
    if len(model.layers) > 1:
        # llama's sliding layer (window 8, no cache): the op gets the window
        # as structure, not mlx-lm's (24, 24) boolean band.
        assert calls[1]["mask"] == "causal" and calls[1]["window"] == SLIDING_WINDOW


@pytest.mark.parametrize("variant", ["manual", "blockwise"])
def test_logits_match_for_explicit_variants(variant, calls):
    model = tinyqwen()
    x = tokens(12)
    expected = model(x)
    with mlx_flash.patched(variant):
        got = model(x)
    assert_close(got, expected, CLOSE)
    assert [c["plan"].implementation for c in calls] == [variant]


def lora_loss(model, x):
    logits = model(x[:, :-1])
    return nn.losses.cross_entropy(logits, x[:, 1:], reduction="mean")


@pytest.mark.parametrize("name", sorted(MODELS))
def test_lora_training_step_matches(name, calls):
    model = MODELS[name]()
    model.freeze()
    linear_to_lora_layers(model, len(model.layers), {"rank": 4, "scale": 10.0, "dropout": 0.0})
    # lora_b starts at zero, which would make every lora_a gradient zero.
    mx.random.seed(3)
    for _, layer in model.named_modules():
        if hasattr(layer, "lora_b"):
            layer.lora_b = 0.01 * mx.random.normal(layer.lora_b.shape)
    mx.eval(model.parameters())

    x = tokens(25, seed=4)
    step = nn.value_and_grad(model, lora_loss)
    loss, grads = step(model, x)
    mx.eval(loss, grads)
    with mlx_flash.patched():
        flash_loss, flash_grads = step(model, x)
        mx.eval(flash_loss, flash_grads)

    assert len(calls) == len(model.layers)
    assert all(c["plan"].implementation != "mlx" for c in calls)
    assert abs(loss.item() - flash_loss.item()) < 1e-5
    expected = dict(tree_flatten(grads))
    got = dict(tree_flatten(flash_grads))
    assert sorted(got) == sorted(expected)
    assert any("lora_a" in name for name in got) and any("lora_b" in name for name in got)
    for name, grad in expected.items():
        assert mx.abs(grad).max().item() > 0, name
        scale = mx.abs(grad).max().item()
        assert_close(got[name] / scale, grad / scale, CLOSE, name)


def greedy(model, prompt, **kwargs):
    """Eight greedy tokens and the log-probabilities each was picked from."""
    steps = list(generate_step(prompt, model, max_tokens=8, **kwargs))
    return [t for t, _ in steps], mx.stack([logprobs for _, logprobs in steps])


def test_greedy_generation_with_kv_cache_matches(model, calls):
    prompt = tokens(16, seed=5)[0]
    expected, expected_logprobs = greedy(model, prompt)
    with mlx_flash.patched():
        got, logprobs = greedy(model, prompt)
    assert got == expected
    # A tiny random model may repeat one token; the distributions still
    # have to agree at every step, cache included.
    assert_close(logprobs, expected_logprobs, CLOSE)
    # The 15-token prefill goes through the fused path; the decoding steps
    # (one query) are routed to MLX's inference kernel by "auto".
    prefill = [c for c in calls if c["q_len"] == 15]
    decode = [c for c in calls if c["q_len"] == 1]
    assert len(prefill) == len(model.layers)
    assert all(c["plan"].implementation != "mlx" for c in prefill)
    # The last prompt token, then one step per generated token but the last.
    assert len(decode) == 9 * len(model.layers)
    assert all(c["plan"].implementation == "mlx" for c in decode)


def test_sliding_window_cache_mask_passes_through(calls):
    model = tinyllama()
    cache = make_prompt_cache(model)
    assert isinstance(cache[1], RotatingKVCache)
    x = tokens(20, seed=6)
    expected = model(x, cache=make_prompt_cache(model))
    with mlx_flash.patched("manual"):
        got = model(x, cache=cache)
    assert_close(got, expected, CLOSE)
    full, sliding = calls
    assert full["mask"] == "causal"
    assert isinstance(sliding["mask"], mx.array)
    assert sliding["mask"].sum().item() == sum(min(i + 1, SLIDING_WINDOW) for i in range(20))


def test_quantized_cache_goes_to_mlx_lm_quantized_path(monkeypatch, calls):
    model = tinyqwen()
    quantized = []
    real_quantized = base.quantized_scaled_dot_product_attention

    def counting_quantized(queries, *args, **kwargs):
        quantized.append(queries.shape[2])
        return real_quantized(queries, *args, **kwargs)

    monkeypatch.setattr(base, "quantized_scaled_dot_product_attention", counting_quantized)
    prompt = tokens(24, seed=7)[0]
    options = dict(kv_bits=8, kv_group_size=64, quantized_kv_start=0, prefill_step_size=10)
    expected, expected_logprobs = greedy(model, prompt, **options)
    assert quantized
    quantized.clear()

    with mlx_flash.patched():
        got, logprobs = greedy(model, prompt, **options)
    assert got == expected
    assert_close(logprobs, expected_logprobs, CLOSE)
    # The first 10-token chunk fills a plain cache and goes to mlx-flash; the
    # cache is then quantized, and every later call, the 10-token second chunk
    # included, goes to mlx-lm's quantized attention.
    assert [c["q_len"] for c in calls] == [10]
    assert quantized == [10, 3] + [1] * 9


def test_quantized_cache_with_sinks_keeps_mlx_lm_error():
    cache = QuantizedKVCache(group_size=64, bits=8)
    k = mx.random.normal((1, 2, 4, 64))
    keys, values = cache.update_and_fetch(k, k)
    mlx_flash.patch()
    with pytest.raises(ValueError, match="Quantized SDPA does not support attention sinks"):
        base.scaled_dot_product_attention(
            mx.random.normal((1, 4, 4, 64)), keys, values, cache, 0.125, None, sinks=mx.zeros((4,))
        )


def tiny_gpt_oss() -> nn.Module:
    mx.random.seed(8)
    args = gpt_oss.ModelArgs(
        num_hidden_layers=2,
        num_local_experts=2,
        num_experts_per_tok=1,
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=32,
        head_dim=16,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=SLIDING_WINDOW,
        layer_types=["sliding_attention", "full_attention"],
    )
    model = gpt_oss.Model(args)
    for layer in model.model.layers:
        layer.self_attn.sinks = mx.random.normal((4,))
    mx.eval(model.parameters())
    return model


@pytest.mark.parametrize("variant", ["auto", "manual"])
def test_attention_sinks_and_sliding_window_pass_through(variant, calls):
    model = tiny_gpt_oss()
    x = tokens(20, seed=9)
    expected = model(x)
    with mlx_flash.patched(variant):
        got = model(x)
    assert_close(got, expected, CLOSE)
    sliding, full = calls
    for call, layer in zip(calls, model.model.layers):
        assert call["sinks"] is layer.self_attn.sinks
    # Training (no cache): the sliding layer's window reaches the op as
    # structure, with the sinks.
    assert sliding["mask"] == "causal" and sliding["window"] == SLIDING_WINDOW
    assert full["mask"] == "causal" and "window" not in full
    # Without Metal "auto" runs sinks and windows blockwise (fused, with the
    # sinks' gradient); "manual" runs the reference with them.
    assert sliding["plan"].implementation == ("blockwise" if variant == "auto" else "manual")


def test_module_calling_mx_fast_directly_goes_through_the_proxy(calls):
    from mlx_lm.models import deepseek_v41

    mx.random.seed(10)
    q = mx.random.normal((1, 3, 4, 16))
    kvs = [mx.random.normal((1, 6, 16))]
    indices = [mx.array([[[0, 2, -1], [1, 5, 3], [4, -1, -1]]])]
    sinks = mx.random.normal((4,))
    expected = deepseek_v41._sparse_attention(q, kvs, indices, sinks=sinks, scale=0.25)
    with mlx_flash.patched("manual"):
        got = deepseek_v41._sparse_attention(q, kvs, indices, sinks=sinks, scale=0.25)
    assert_close(got, expected, CLOSE)
    assert len(calls) == 1 and calls[0]["plan"].implementation == "manual"
    assert calls[0]["mask"].shape == (3, 1, 1, 3)


# -- later imports, in a fresh interpreter, and mlx_flash.auto --------------------


def run_python(code: str, **env) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_model_module_imported_after_patch_is_patched():
    result = run_python(
        """
        import importlib, sys
        import mlx.core as mx
        import mlx_flash
        from mlx_lm.models import base
        from mlx_lm.utils import _get_classes

        original = base.scaled_dot_product_attention
        mlx_flash.patch()
        assert "mlx_lm.models.qwen3" not in sys.modules
        assert "mlx_lm.models.plamo2" not in sys.modules
        # mlx-lm's own lazy import by model_type.
        model_class, _ = _get_classes({"model_type": "qwen3"})
        qwen3 = sys.modules["mlx_lm.models.qwen3"]
        plamo2 = importlib.import_module("mlx_lm.models.plamo2")
        patched = sys.modules["mlx_flash.patch"].scaled_dot_product_attention
        assert qwen3.scaled_dot_product_attention is patched
        assert plamo2.mx is not mx and plamo2.mx.zeros is mx.zeros
        # The module keeps its real loader, as on an ordinary import.
        assert type(plamo2.__loader__).__name__ == "SourceFileLoader"
        assert plamo2.__spec__.loader is plamo2.__loader__
        assert "mlx_lm.models.qwen3" in mlx_flash.patch_state().modules

        mlx_flash.unpatch()
        assert qwen3.scaled_dot_product_attention is original
        assert plamo2.mx is mx
        gemma = importlib.import_module("mlx_lm.models.gemma")
        assert gemma.scaled_dot_product_attention is original
        print("ok")
        """
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_every_model_module_reaching_attention_is_patched():
    result = run_python(
        """
        import importlib, json, pkgutil
        import mlx_flash
        import mlx_lm.models

        mlx_flash.patch()
        users = []
        for info in pkgutil.iter_modules(mlx_lm.models.__path__):
            name = "mlx_lm.models." + info.name
            try:
                module = importlib.import_module(name)
            except BaseException:
                continue  # needs a package that is not installed (olmo)
            with open(module.__file__) as f:
                if "scaled_dot_product_attention" in f.read():
                    users.append(name)
        patched = mlx_flash.patch_state().modules
        mlx_flash.unpatch()
        print(json.dumps([users, patched, mlx_flash.patch_state().modules]))
        """
    )
    assert result.returncode == 0, result.stderr
    users, patched, after_unpatch = json.loads(result.stdout.strip().splitlines()[-1])
    assert len(users) >= 50  # llama, qwen2, mistral, gemma, phi3, ...
    assert {"mlx_lm.models.llama", "mlx_lm.models.qwen2", "mlx_lm.models.plamo2"} <= set(users)
    assert sorted(set(users) - set(patched)) == []
    assert after_unpatch == []


def import_auto(monkeypatch, **env):
    """Run ``import mlx_flash.auto`` afresh under ``env``."""
    for name in ("MLX_FLASH_VARIANT", "MLX_FLASH_DISABLE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delitem(sys.modules, "mlx_flash.auto", raising=False)
    importlib.import_module("mlx_flash.auto")


@pytest.mark.parametrize(
    "env, expected",
    [
        ({}, (True, "auto")),
        ({"MLX_FLASH_VARIANT": "manual"}, (True, "manual")),
        ({"MLX_FLASH_DISABLE": "0"}, (True, "auto")),
        ({"MLX_FLASH_DISABLE": "1"}, (False, None)),
        ({"MLX_FLASH_DISABLE": "1", "MLX_FLASH_VARIANT": "manual"}, (False, None)),
    ],
)
def test_import_auto_patches_on_import(monkeypatch, env, expected):
    import_auto(monkeypatch, **env)
    state = mlx_flash.patch_state()
    assert (state.active, state.variant) == expected
    assert (llama.scaled_dot_product_attention is ORIGINAL_SDPA) != expected[0]


@pytest.mark.parametrize(
    "env, message",
    [
        ({"MLX_FLASH_VARIANT": "flash"}, "MLX_FLASH_VARIANT\\] unknown variant 'flash'.*Choose one of auto, manual"),
        ({"MLX_FLASH_DISABLE": "maybe"}, "MLX_FLASH_DISABLE='maybe' is not understood"),
    ],
)
def test_import_auto_rejects_bad_environment(monkeypatch, env, message):
    with pytest.raises(ValueError, match=message):
        import_auto(monkeypatch, **env)
    assert not mlx_flash.is_patched()
