"""Context parallelism (mlx_flash.context): ranks under ``mlx.launch`` on the
ring backend, on localhost, against one process on the whole row."""

import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_flash import context

REPO = Path(__file__).resolve().parents[1]
LAUNCH = Path(sys.executable).parent / "mlx.launch"
WORKER = REPO / "tests" / "context_worker.py"
CASES = ("llama_packed", "llama_window_packed", "llama_window", "qwen2_causal_checkpointed")


def launch(n: int, *args, cwd=None, timeout=300):
    env_args = [str(LAUNCH), "-n", str(n), "--backend", "ring", "--", sys.executable, *args]
    result = subprocess.run(env_args, capture_output=True, text=True, cwd=cwd or REPO, timeout=timeout)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    return result


@pytest.mark.parametrize("ranks", [2, 3])
def test_step_equals_one_process_on_the_whole_row(ranks, tmp_path):
    # Rows of 60 inputs: 2 slices of 30 or 3 of 20, documents straddling
    # both boundaries, GQA (4 query heads, 2 KV heads), causal, sliding
    # windows, q/k/v bias, gradient checkpointing.
    launch(ranks, str(WORKER), str(tmp_path))
    for rank in range(ranks):
        found = np.load(tmp_path / f"rank{rank}.npz")
        for case in CASES:
            single = {k.split("/", 2)[2]: found[k] for k in found if k.startswith(f"{case}/single/")}
            parallel = {k.split("/", 2)[2]: found[k] for k in found if k.startswith(f"{case}/cp/")}
            assert parallel["loss"] == pytest.approx(float(single["loss"]), rel=1e-5), case
            assert parallel["val_loss"] == pytest.approx(float(single["loss"]), rel=1e-5), case
            assert len(single) > 10  # the loss and every LoRA gradient
            for name, expected in single.items():
                scale = np.abs(expected).max()
                assert scale > 0, (case, name)
                np.testing.assert_allclose(parallel[name], expected, rtol=0, atol=1e-5 * scale, err_msg=f"{case} {name}")
        expected_counts = {"llama_packed": 102, "llama_window_packed": 102, "llama_window": 120, "qwen2_causal_checkpointed": 120}
        for case, count in expected_counts.items():
            assert int(found[f"{case}/cp/count"]) == count


def test_grid_places_ranks_and_refuses_what_does_not_divide():
    class World:
        def __init__(self, rank, size):
            self._rank, self._size = rank, size

        def rank(self):
            return self._rank

        def size(self):
            return self._size

        def split(self, color, key):
            raise RuntimeError("[ring] Group split not supported.")

    g = context.grid(2, World(3, 4))
    assert (g.cp, g.index, g.dp, g.dp_index, g.first) == (2, 1, 2, 1, 2)
    g = context.grid(3, World(2, 3))
    assert (g.cp, g.index, g.dp, g.dp_index, g.first) == (3, 2, 1, 0, 0)
    g = context.grid(1, World(1, 2))
    assert (g.cp, g.dp, g.dp_index, g.group) == (1, 2, 1, None)
    with pytest.raises(ValueError, match=r"^context_parallel: 3 does not divide the 4 ranks"):
        context.grid(3, World(0, 4))
    with pytest.raises(ValueError, match=r"^context_parallel: must be a positive integer, got 0$"):
        context.grid(0, World(0, 1))


def test_traffic_counts_the_gather_and_the_all_sum():
    # Qwen2.5-1.5B: 2 KV heads of 128 (K and V: 256 values), float32, L = 16384, 2 ranks.
    moved = context.traffic(2, 1, 16384, 2, 256, 4)
    assert moved == {"forward_bytes": 16384 * 2 * 256 * 4 // 2, "backward_bytes": 16384 * 2 * 256 * 4}


def test_slice_cache_needs_the_patch_and_whole_row_ids():
    g = context.Grid(2, 1, 1, 0)
    cache = context.SliceCache(g, 8)
    assert cache.offset == 8 and cache.make_mask(8) == "causal" and cache.make_mask(8, window_size=4) == context.Window(4)
    assert cache.make_mask(8, window_size=16) == "causal"
    with pytest.raises(ValueError, match="needs mlx-lm patched"):
        cache.update_and_fetch(mx.zeros((1, 2, 8, 4)), mx.zeros((1, 2, 8, 4)))
    with pytest.raises(ValueError, match="ids cover 8 tokens, not the 2 x 8"):
        context.SliceCache(g, 8, mx.zeros((1, 8), mx.int32))


def test_split_row_pads_the_end_then_slices():
    g = context.Grid(3, 2, 1, 0)
    x = mx.arange(8)[None]
    assert context.split_row(x, g, -1).tolist() == [[6, 7, -1]]
