"""Sliding windows, sinks and packed documents through the mlx-lm patch.

Tiny models are built from configs (no download) of mlx-lm's ``llama``
(with ``layer_types`` and ``sliding_window``, as Mistral configs load),
``ministral3``, ``gemma3_text``, ``gpt_oss`` (sinks and windows) and the
TinyLlama / Qwen2.5 geometries. The unpatched model (MLX's own attention on
mlx-lm's dense masks) is the oracle; packed rows are checked against their
documents run one by one, unpacked.
"""

import importlib

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.generate import generate_step
from mlx_lm.models import gemma3_text, gpt_oss, llama, ministral3, qwen2
from mlx_lm.tuner.utils import linear_to_lora_layers

import mlx_flash
from conftest import assert_close

patch_module = importlib.import_module("mlx_flash.patch")

VOCAB = 96
WINDOW = 6


pytestmark = pytest.mark.usefixtures("unpatched")


def _finish(model):
    mx.eval(model.parameters())
    return model


def mistral_like():
    mx.random.seed(20)
    args = llama.ModelArgs(
        model_type="llama", hidden_size=64, num_hidden_layers=2, intermediate_size=64,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
        vocab_size=VOCAB, layer_types=["sliding_attention", "full_attention"],
        sliding_window=WINDOW, tie_word_embeddings=False,
    )
    return _finish(llama.Model(args))


def ministral():
    mx.random.seed(21)
    args = ministral3.ModelArgs(
        model_type="ministral3", hidden_size=64, num_hidden_layers=2, intermediate_size=64,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
        vocab_size=VOCAB, layer_types=["sliding_attention", "full_attention"],
        sliding_window=WINDOW, max_position_embeddings=4096,
        rope_parameters={"rope_theta": 10000.0, "rope_type": "default", "llama_4_scaling_beta": 0.1, "original_max_position_embeddings": 4096},
    )
    return _finish(ministral3.Model(args))


def gemma3():
    mx.random.seed(22)
    args = gemma3_text.ModelArgs(
        model_type="gemma3_text", hidden_size=64, num_hidden_layers=2, intermediate_size=64,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=VOCAB,
        sliding_window=WINDOW, sliding_window_pattern=2, query_pre_attn_scalar=16,
    )
    return _finish(gemma3_text.Model(args))


def gpt_oss_model():
    mx.random.seed(23)
    args = gpt_oss.ModelArgs(
        num_hidden_layers=2, num_local_experts=2, num_experts_per_tok=1, vocab_size=VOCAB,
        hidden_size=64, intermediate_size=32, head_dim=16, num_attention_heads=4,
        num_key_value_heads=2, sliding_window=WINDOW,
        layer_types=["sliding_attention", "full_attention"],
    )
    model = gpt_oss.Model(args)
    for layer in model.model.layers:
        layer.self_attn.sinks = mx.random.normal((4,))
    return _finish(model)


def tinyllama():
    """TinyLlama-1.1B's attention geometry: 32 query heads, 4 KV heads, head dim 64."""
    mx.random.seed(24)
    args = llama.ModelArgs(
        model_type="llama", hidden_size=32 * 64, num_hidden_layers=1, intermediate_size=32,
        num_attention_heads=32, num_key_value_heads=4, rms_norm_eps=1e-5, vocab_size=VOCAB,
        tie_word_embeddings=False,
    )
    return _finish(llama.Model(args))


def tinyqwen():
    """Qwen2.5-1.5B's attention geometry: 12 query heads, 2 KV heads, head dim 128, q/k/v bias."""
    mx.random.seed(25)
    args = qwen2.ModelArgs(
        model_type="qwen2", hidden_size=12 * 128, num_hidden_layers=1, intermediate_size=32,
        num_attention_heads=12, num_key_value_heads=2, rms_norm_eps=1e-6, vocab_size=VOCAB,
    )
    model = qwen2.Model(args)
    for layer in model.layers:
        for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
            proj.bias = 0.1 * mx.random.normal(proj.bias.shape)
    return _finish(model)


WINDOWED = {"mistral": mistral_like, "ministral3": ministral, "gemma3_text": gemma3, "gpt_oss": gpt_oss_model}


def tokens(length, batch=1, seed=2):
    return mx.random.randint(0, VOCAB, (batch, length), key=mx.random.key(seed))


@pytest.fixture
def calls(monkeypatch):
    """What the patched attention hands to mlx-flash's op, per call."""
    seen = []
    real = patch_module.flash_attention

    def recording(q, k, v, *, scale, mask=None, sinks=None, variant="auto", **structure):
        seen.append(dict(q_len=q.shape[2], mask=mask, sinks=sinks, **structure))
        return real(q, k, v, scale=scale, mask=mask, sinks=sinks, variant=variant, **structure)

    monkeypatch.setattr(patch_module, "flash_attention", recording)
    return seen


#: Every element within 1e-4: at least as strict as ``mx.allclose`` at
#: ``atol=1e-4`` whatever its ``rtol``.
CLOSE = (1e-4, 0.0)


def with_lora(model, seed=3):
    model.freeze()
    linear_to_lora_layers(model, len(model.layers), {"rank": 4, "scale": 10.0, "dropout": 0.0})
    mx.random.seed(seed)
    for _, layer in model.named_modules():
        if hasattr(layer, "lora_b"):
            layer.lora_b = 0.01 * mx.random.normal(layer.lora_b.shape)
    mx.eval(model.parameters())
    return model


def lm_loss(model, x):
    logits = model(x[:, :-1])
    return nn.losses.cross_entropy(logits, x[:, 1:], reduction="mean")


def assert_grads_close(got, expected, what):
    got, expected = dict(tree_flatten(got)), dict(tree_flatten(expected))
    assert sorted(got) == sorted(expected)
    for name, grad in expected.items():
        scale = max(mx.abs(grad).max().item(), 1e-12)
        assert_close(got[name] / scale, grad / scale, CLOSE, f"{what} {name}")


# -- sliding windows and sinks -------------------------------------------------


@pytest.mark.parametrize("name", sorted(WINDOWED))
@pytest.mark.parametrize("variant", ["blockwise", "manual"])
def test_windowed_models_logits_match_and_get_the_window_as_structure(name, variant, calls):
    model = WINDOWED[name]()
    x = tokens(20)
    expected = model(x)
    with mlx_flash.patched(variant):
        got = model(x)
    assert_close(got, expected, CLOSE, name)
    windowed = [c for c in calls if "window" in c]
    assert windowed and all(c["window"] == WINDOW and c["mask"] == "causal" for c in windowed)
    # No call received mlx-lm's dense (L, L) window band.
    assert not any(isinstance(c["mask"], mx.array) for c in calls)
    if name == "gpt_oss":
        assert all(c["sinks"] is not None for c in calls)


@pytest.mark.parametrize("name", sorted(WINDOWED))
def test_windowed_models_generate_the_same_tokens(name, calls):
    model = WINDOWED[name]()
    prompt = tokens(14, seed=5)[0]

    def greedy():
        steps = list(generate_step(prompt, model, max_tokens=6))
        return [t for t, _ in steps], mx.stack([p for _, p in steps])

    expected, expected_logprobs = greedy()
    with mlx_flash.patched("blockwise"):
        got, logprobs = greedy()
    assert got == expected
    assert_close(logprobs, expected_logprobs, CLOSE, name)
    # With a KV cache mlx-lm's own masks are kept: no call is given a window.
    assert calls and not any("window" in c for c in calls)


@pytest.mark.parametrize("name", sorted(WINDOWED))
def test_windowed_models_lora_gradients_match(name, calls):
    model = with_lora(WINDOWED[name]())
    x = tokens(23, batch=2, seed=4)
    step = nn.value_and_grad(model, lm_loss)
    loss, grads = step(model, x)
    with mlx_flash.patched("blockwise"):
        flash_loss, flash_grads = step(model, x)
    assert abs(loss.item() - flash_loss.item()) < 1e-5
    assert_grads_close(flash_grads, grads, name)
    assert any("window" in c for c in calls)


def test_compiled_lora_step_of_a_windowed_model_with_sinks():
    model = with_lora(gpt_oss_model())
    x = tokens(21, batch=2, seed=6)
    loss_and_grad = nn.value_and_grad(model, lm_loss)
    expected_loss, expected_grads = loss_and_grad(model, x)
    with mlx_flash.patched("blockwise"):
        step = mx.compile(lambda x: loss_and_grad(model, x), inputs=model.state, outputs=model.state)
        loss, grads = step(x)
        mx.eval(loss, grads)
    assert abs(loss.item() - expected_loss.item()) < 1e-5
    assert_grads_close(grads, expected_grads, "compiled")


def test_sink_gradients_through_the_patch():
    """gpt-oss's sinks are trainable parameters: their gradient through the
    patched (fused) attention equals MLX's unfused one."""
    model = gpt_oss_model()
    model.freeze()
    for layer in model.model.layers:
        layer.self_attn.unfreeze(keys=["sinks"], recurse=False)
    x = tokens(19, seed=7)
    step = nn.value_and_grad(model, lm_loss)
    _, grads = step(model, x)
    with mlx_flash.patched("blockwise"):
        _, flash_grads = step(model, x)
    flat = dict(tree_flatten(flash_grads))
    assert sorted(flat) == [f"model.layers.{i}.self_attn.sinks" for i in range(2)]
    assert_grads_close(flash_grads, grads, "sinks")


def test_windowed_training_step_builds_no_l_by_l_array():
    """Peak memory of a windowed model's training step at L = 1024 and 2048:
    patched, it grows about linearly, and stays far below the unpatched
    step, whose dense masks and scores are L x L."""
    mx.random.seed(26)
    # mlx-lm's llama needs one full-attention layer; the other slides.
    args = llama.ModelArgs(
        model_type="llama", hidden_size=32, num_hidden_layers=2, intermediate_size=32,
        num_attention_heads=2, num_key_value_heads=1, head_dim=16, rms_norm_eps=1e-5,
        vocab_size=VOCAB, layer_types=["sliding_attention", "full_attention"],
        sliding_window=64, tie_word_embeddings=False,
    )
    model = _finish(llama.Model(args))

    def peak(L, patched):
        x = tokens(L + 1, seed=L)
        mx.eval(x)
        step = nn.value_and_grad(model, lm_loss)
        mx.reset_peak_memory()
        base = mx.get_active_memory()
        if patched:
            with mlx_flash.patched("blockwise"):
                mx.eval(step(model, x))
        else:
            mx.eval(step(model, x))
        return mx.get_peak_memory() - base

    small, large = peak(1024, True), peak(2048, True)
    assert large < 2.6 * small, (small, large)
    assert large * 4 < peak(2048, False)


# -- packed documents ----------------------------------------------------------


def packed_rows(lengths_per_row, seed=8):
    """Token rows of packed documents, their ids, and the documents alone."""
    rng = np.random.default_rng(seed)
    rows, ids, docs = [], [], []
    width = max(sum(lengths) for lengths in lengths_per_row)
    for lengths in lengths_per_row:
        row, row_ids = [], []
        for d, n in enumerate(lengths):
            doc = rng.integers(0, VOCAB, n).tolist()
            docs.append(doc)
            row += doc
            row_ids += [d] * n
        pad = width - len(row)
        rows.append(row + [0] * pad)
        ids.append(row_ids + [-1] * pad)
    return mx.array(rows), mx.array(ids, dtype=mx.int32), docs


def token_losses(logits, targets):
    return nn.losses.cross_entropy(logits, targets, reduction="none")


def packed_loss(model, rows, ids):
    """Sum of next-token losses whose target is in the same document."""
    inputs, targets = rows[:, :-1], rows[:, 1:]
    with mlx_flash.segments(ids[:, :-1]):
        logits = model(inputs)
    same = (ids[:, 1:] == ids[:, :-1]) & (ids[:, 1:] >= 0)
    return mx.sum(token_losses(logits, targets) * same)


def documents_loss(model, docs):
    total = 0.0
    for doc in docs:
        if len(doc) < 2:
            continue  # a one-token document has no next token to predict
        x = mx.array([doc])
        total = total + mx.sum(token_losses(model(x[:, :-1]), x[:, 1:]))
    return total


@pytest.mark.parametrize("build", [tinyllama, tinyqwen], ids=["tinyllama", "tinyqwen"])
def test_packed_loss_and_lora_gradients_equal_the_documents_alone(build):
    model = with_lora(build())
    rows, ids, docs = packed_rows([[5, 9, 3, 7], [12, 1, 8], [4, 4]])
    loss_and_grad = nn.value_and_grad(model, documents_loss)
    expected_loss, expected_grads = loss_and_grad(model, docs)
    for variant in ("blockwise", "manual"):
        with mlx_flash.patched(variant):
            loss, grads = nn.value_and_grad(model, packed_loss)(model, rows, ids)
        assert abs(loss.item() - expected_loss.item()) < 1e-4 * abs(expected_loss.item()), variant
        assert_grads_close(grads, expected_grads, variant)


def test_compiled_packed_step_takes_new_layouts_each_call():
    model = with_lora(tinyllama())
    loss_and_grad = nn.value_and_grad(model, packed_loss)
    with mlx_flash.patched("blockwise"):
        # As in mlx-lm's trainer: the model's state is an input and an output
        # (value_and_grad rebinds the parameters while tracing).
        step = mx.compile(lambda rows, ids: loss_and_grad(model, rows, ids), inputs=model.state, outputs=model.state)
        for layout, seed in (([[6, 10, 8]], 9), ([[3, 3, 3, 3, 12]], 10)):
            rows, ids, docs = packed_rows(layout, seed)
            loss, grads = step(rows, ids)
            expected_loss, expected_grads = nn.value_and_grad(model, documents_loss)(model, docs)
            assert abs(loss.item() - expected_loss.item()) < 1e-4 * abs(expected_loss.item())
            assert_grads_close(grads, expected_grads, f"layout {layout}")


def test_segments_that_do_not_fit_the_call_are_an_error():
    model = tinyllama()
    x = tokens(10)
    with mlx_flash.patched("blockwise"), mlx_flash.segments(mx.zeros((1, 12), mx.int32)):
        with pytest.raises(ValueError, match=r"ids of shape \(1, 12\) do not fit an attention call"):
            model(x)
    with pytest.raises(ValueError, match="integer mx.array"):
        with mlx_flash.segments(mx.zeros((1, 12))):
            pass
