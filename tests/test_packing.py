"""Sequence packing for fine-tuning: whole examples in rows, document ids,
targets that never cross a document, and a packed loss equal to the
examples' own."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models import gpt2, llama
from mlx_lm.tuner.utils import linear_to_lora_layers

import mlx_flash
from mlx_flash.finetune import packing
from mlx_flash.finetune.batches import Batches


def examples(lengths, offsets=None, seed=0):
    rng = np.random.default_rng(seed)
    offsets = offsets or [0] * len(lengths)
    return [(rng.integers(3, 90, n).tolist(), o) for n, o in zip(lengths, offsets)]


def test_whole_examples_fill_rows_best_fit():
    data = examples([7, 3, 5, 2, 8, 1, 4])
    packed = packing.PackedDataset(data, length=10)
    seen = []
    for tokens, ids, targets in (packed[i] for i in range(len(packed))):
        assert tokens.shape == ids.shape == (10,) and targets.shape == (9,)
        for doc in sorted(set(ids.tolist()) - {packing.PAD_ID}):
            where = np.flatnonzero(ids == doc)
            assert np.all(np.diff(where) == 1), "a document is contiguous"
            seen.append(tokens[where].tolist())
        pad = ids == packing.PAD_ID
        assert np.all(tokens[pad] == packing.PAD_TOKEN)
        assert not pad.any() or pad[np.argmax(pad) :].all(), "padding only at the end"
    # Every example exactly once, never split.
    assert sorted(map(tuple, seen)) == sorted(tuple(t) for t, _ in data)
    # 30 tokens in rows of 10: best fit needs 3 rows, all full.
    assert len(packed) == 3 and packed.fill_ratio == 1.0
    assert packed.tokens == 30 and packed.examples == 7


def test_long_examples_are_truncated_and_short_sets_repeat_rows():
    packed = packing.PackedDataset(examples([25, 4]), length=10, min_rows=4)
    assert packed.truncated == 1
    assert len(packed) == 4
    assert packed[0][1].tolist() == [0] * 10  # the truncated example fills a row
    assert packed.fill_ratio == pytest.approx(14 / 20)


def test_targets_stay_inside_documents_and_honour_mask_prompt():
    data = examples([4, 5], offsets=[2, 3])
    tokens, ids, targets = packing.PackedDataset(data, length=12)[0]
    # Row: 5 tokens of one example, 4 of the other (longest first), 3 pads.
    assert ids.tolist() == [0] * 5 + [1] * 4 + [-1] * 3
    # target t predicts token t + 1: counts only inside one document.
    assert targets.tolist() == [1, 1, 1, 1, 0, 1, 1, 1, 0, 0, 0]
    _, _, masked = packing.PackedDataset(data, length=12, mask_prompt=True)[0]
    # From each example's offset on (mlx-lm's rule): tokens 3.. and 2..
    assert masked.tolist() == [0, 0, 1, 1, 0, 0, 1, 1, 0, 0, 0]


def test_packed_batches_are_reproducible_and_resumable():
    packed = packing.PackedDataset(examples([3] * 40), length=6)
    first = Batches(packed, 4, 6, seed=3)
    again = Batches(packed, 4, 6, seed=3)
    for k in range(4, 9):  # a resumed run asks for batch k first
        a, b = first.batch(k), again.batch(k)
        assert all(mx.array_equal(x, y).item() for x, y in zip(a, b))
    assert [tuple(x.shape) for x in first.batch(0)] == [(4, 6), (4, 6), (4, 5)]
    assert not all(mx.array_equal(x, y).item() for x, y in zip(first.batch(0), first.batch(1)))


def tiny_model(seed=0):
    mx.random.seed(seed)
    args = llama.ModelArgs(
        model_type="llama", hidden_size=64, num_hidden_layers=2, intermediate_size=64,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, rms_norm_eps=1e-5,
        vocab_size=96, tie_word_embeddings=True,
    )
    model = llama.Model(args)
    model.freeze()
    linear_to_lora_layers(model, 2, {"rank": 4, "scale": 10.0, "dropout": 0.0})
    for _, layer in model.named_modules():
        if hasattr(layer, "lora_b"):
            layer.lora_b = 0.01 * mx.random.normal(layer.lora_b.shape)
    mx.eval(model.parameters())
    return model


def test_packed_loss_equals_the_examples_run_alone():
    """Loss and LoRA gradients of a packed batch equal those of its examples
    run one by one, unpacked (targets weighted the same way)."""
    data = examples([9, 14, 3, 21, 6, 11, 2], offsets=[0, 4, 0, 5, 1, 0, 0], seed=1)
    packed = packing.PackedDataset(data, length=32, mask_prompt=True)
    batch = Batches(packed, len(packed), 32, seed=0).batch(0)
    model = tiny_model()

    def alone(model):
        total, count = 0.0, 0
        for tokens, offset in data:
            x = mx.array([tokens])
            ce = nn.losses.cross_entropy(model(x[:, :-1]), x[:, 1:])
            keep = mx.arange(1, len(tokens)) >= offset
            total = total + mx.sum(ce * keep)
            count += int(keep.sum().item())
        return total / count

    expected_loss, expected_grads = nn.value_and_grad(model, alone)(model)
    with mlx_flash.patched("blockwise"):
        (loss, n_targets), grads = nn.value_and_grad(model, packing.packed_loss)(model, *batch)
    assert n_targets.item() == sum(len(t) - max(1, o) for t, o in data)
    assert abs(loss.item() - expected_loss.item()) < 1e-5
    with mlx_flash.patched("blockwise"):
        pairs = [pair for row in range(len(packed)) for pair in packing.document_losses(model, *packed[row])]
    assert len(pairs) == sum(1 for t, _ in data if len(t) > 1)
    assert max(abs(a - b) for a, b in pairs) < 1e-4
    expected = dict(tree_flatten(expected_grads))
    for name, grad in tree_flatten(grads):
        scale = max(mx.abs(expected[name]).max().item(), 1e-12)
        assert mx.allclose(grad / scale, expected[name] / scale, atol=1e-4).item(), name


def test_models_with_absolute_positions_are_refused():
    args = gpt2.ModelArgs(
        model_type="gpt2", n_ctx=64, n_embd=32, n_head=2, n_layer=1, n_positions=64,
        layer_norm_epsilon=1e-5, vocab_size=50,
    )
    with pytest.raises(ValueError, match="model type 'gpt2' has learned absolute position embeddings"):
        packing.check_model(gpt2.Model(args), "gpt2")
    packing.check_model(tiny_model(), "llama")
