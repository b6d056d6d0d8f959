"""The benchmark times its variants in rounds (A B C A B C ...) and reports
each speedup with the range of its round-by-round ratios."""

import pytest

import mlx_flash
from mlx_flash.bench import harness, report


@pytest.fixture
def registry(monkeypatch):
    monkeypatch.setattr(harness, "VARIANTS", dict(harness.VARIANTS))
    return harness.VARIANTS


def test_variants_are_timed_in_rounds(registry):
    calls = []

    def recorder(name):
        def fn(q, k, v, scale, mask):
            calls.append(name)
            return mlx_flash.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask, variant="manual")

        return fn

    for name in ("a", "b", "c"):
        harness.register_variant(name, recorder(name))
    config = harness.Config("fwd", 1, 16, 2, 1, 8, "causal", "float32")
    cells = harness.run([config], ["a", "b", "c"], warmup=2, repeats=3, share=False)
    assert [c.status for c in cells] == ["ok"] * 3
    # One checked run each, then warm-up and timed rounds: a b c, a b c, ...
    assert calls == ["a", "b", "c"] + ["a", "b", "c"] * (1 + 3)
    assert all(len(c.times_s) == 3 for c in cells)


def test_speedup_range_is_the_round_by_round_ratios():
    config = harness.Config("fwd", 1, 16, 2, 1, 8, "causal", "float32")
    manual = harness.Cell(config, "manual", status="ok", times_s=[2.0, 2.0, 2.0], median_s=2.0)
    fast = harness.Cell(config, "blockwise", status="ok", times_s=[1.0, 0.5, 2.5], median_s=1.0)
    harness.speedups([manual, fast])
    assert fast.speedup_vs_manual == pytest.approx(2.0)
    assert fast.speedup_vs_manual_range == pytest.approx([0.8, 4.0])
    cell = {"variant": "blockwise", "speedup_vs_manual": 2.0, "speedup_vs_manual_range": [0.8, 4.0]}
    assert report._speedup(cell, "manual") == "no measurable difference (0.80-4.00x)"
    cell["speedup_vs_manual_range"] = [1.5, 4.0]
    assert report._speedup(cell, "manual") == "2.00x (1.50-4.00)"
