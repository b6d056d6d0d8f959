"""Context parallelism (mlx_flash.context): ranks under ``mlx.launch`` on the
ring backend, on localhost, against one process on the whole row."""

import contextlib
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
    # mlx.launch exits 0 even when a rank fails; it says so in a warning.
    assert result.returncode == 0 and "exited with code" not in result.stderr, (result.stdout + result.stderr)[-3000:]
    return result


COUNTS = {"llama_packed": 102, "llama_window_packed": 102, "llama_window": 120, "qwen2_causal_checkpointed": 120}


def check_ranks(out: Path, ranks: int, cases, validation: bool = True):
    for rank in range(ranks):
        found = np.load(out / f"rank{rank}.npz")
        for case in cases:
            single = {k.split("/", 2)[2]: found[k] for k in found if k.startswith(f"{case}/single/")}
            parallel = {k.split("/", 2)[2]: found[k] for k in found if k.startswith(f"{case}/cp/")}
            assert parallel["loss"] == pytest.approx(float(single["loss"]), rel=1e-5), case
            if validation:
                assert parallel["val_loss"] == pytest.approx(float(single["loss"]), rel=1e-5), case
            assert int(parallel["count"]) == COUNTS[case]
            assert len(single) > 10  # the loss and every LoRA gradient
            for name, expected in single.items():
                scale = np.abs(expected).max()
                assert scale > 0, (case, name)
                np.testing.assert_allclose(parallel[name], expected, rtol=0, atol=1e-5 * scale, err_msg=f"{case} {name}")


def test_two_ranks_step_equals_one_process_on_the_whole_row(tmp_path):
    # Rows of 60 inputs in 2 slices of 30, documents straddling the
    # boundary, GQA (4 query heads, 2 KV heads), causal, sliding windows,
    # q/k/v bias, gradient checkpointing.
    launch(2, str(WORKER), str(tmp_path))
    check_ranks(tmp_path, 2, CASES)


def test_three_ranks_slice_and_pad_exactly(tmp_path):
    # 60 inputs padded to 3 slices of 21 (documents straddle 21 and 42).
    cases = ("llama_packed", "llama_window_packed")
    launch(3, str(WORKER), str(tmp_path), "3", *cases)
    check_ranks(tmp_path, 3, cases)


def test_data_parallel_by_context_parallel_grid(tmp_path):
    # 4 ranks: 2 shards of one row each, each row over 2 ranks; the ring
    # backend cannot split groups, so the collectives span all 4 ranks and
    # each rank uses its own row's part.
    launch(4, str(WORKER), str(tmp_path), "2", "llama_window_packed")
    check_ranks(tmp_path, 4, ("llama_window_packed",), validation=False)


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


# The fine-tune: `context_parallel: 2` under mlx.launch.

from finetune_runs import FAST, QUICKSTART, cache, read_records  # noqa: E402,F401 - cache is a fixture

CP_RUN = [*FAST, "--set", "iters=4", "--set", "save_every=2", "--set", "steps_per_eval=4",
          "--set", "attention.compare=[]", "--set", "attention.variant=blockwise"]  # fmt: skip


def finetune(ranks: int, out: Path, *sets: str):
    args = ["-m", "mlx_flash.finetune", str(QUICKSTART), *CP_RUN, *sets, "--out", str(out)]
    if ranks == 1:
        result = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=out.parent, timeout=300)
        assert result.returncode == 0, result.stderr[-3000:]
    else:
        launch(ranks, *args, "--set", f"context_parallel={ranks}", cwd=out.parent)
    return read_records(out / "blockwise" / "metrics.jsonl"), json.loads((out / "blockwise" / "summary.json").read_text())


def test_fine_tune_with_two_ranks_per_row_trains_the_single_process_run_and_resumes(tmp_path):
    single, _ = finetune(1, tmp_path / "single")
    parallel, summary = finetune(2, tmp_path / "cp")
    assert summary["context_parallel"] == 2 and summary["rank_count"] == 2
    assert [r["iteration"] for r in parallel] == [1, 2, 3, 4]
    # Every rank holds half of each row, so the counted targets are the same;
    # the losses agree to float32 rounding (Adam amplifies it a little per step).
    assert [r["tokens"] for r in parallel] == [r["tokens"] for r in single]
    assert parallel[0]["loss"] == pytest.approx(single[0]["loss"], rel=1e-5)
    for p, s in zip(parallel, single):
        assert p["loss"] == pytest.approx(s["loss"], rel=1e-4)
    assert summary["final_val_loss"] == pytest.approx(_summary(tmp_path / "single")["final_val_loss"], rel=1e-4)

    # Stopped after iteration 2 (a run of 2 iterations), then resumed to 4:
    # the run that never stopped, iteration for iteration.
    finetune(2, tmp_path / "parts", "--set", "iters=2")
    resumed, summary = finetune(2, tmp_path / "parts", "--set", "resume=true")
    assert summary["resumed"] and summary["resumed_from_iteration"] == 2
    assert [r["iteration"] for r in resumed] == [1, 2, 3, 4]
    for r, p in zip(resumed, parallel):
        assert r["loss"] == pytest.approx(p["loss"], rel=1e-6)


def _summary(out: Path) -> dict:
    return json.loads((out / "blockwise" / "summary.json").read_text())


def test_context_parallel_key_is_checked_in_one_line(tmp_path):
    from mlx_flash.finetune.config import RecipeError, load_recipe

    with pytest.raises(RecipeError, match=r"^context_parallel: must be at least 1, got 0$"):
        load_recipe(str(QUICKSTART), ["context_parallel=0"])
    with pytest.raises(RecipeError, match=r"^context_parallel: "):
        load_recipe(str(QUICKSTART), ["context_parallel=two"])
    assert load_recipe(str(QUICKSTART)).context_parallel == 1
    # One process cannot hold a row in two slices.
    result = subprocess.run([sys.executable, "-m", "mlx_flash.finetune", str(QUICKSTART), *CP_RUN,
                             "--set", "context_parallel=2", "--out", str(tmp_path / "x")],
                            capture_output=True, text=True, cwd=tmp_path, timeout=120)  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].endswith(
        "context_parallel: 2 does not divide the 1 ranks (launch a multiple of it with mlx.launch)"
    )


def test_one_slice_is_mlx_lms_default_loss_on_padded_rows():
    # mlx-lm's [offset, length] rows: the targets and the mean are
    # default_loss's, and the slice's cache path runs the same attention.
    import mlx.nn as nn
    from mlx_lm.models import llama
    from mlx_lm.tuner.trainer import default_loss

    import mlx_flash

    mx.random.seed(0)
    model = llama.Model(llama.ModelArgs(model_type="llama", hidden_size=32, num_hidden_layers=1, intermediate_size=48,
                                        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=50))  # fmt: skip
    tokens = mx.random.randint(1, 50, (3, 33))
    lengths = mx.array([[0, 33], [5, 20], [2, 9]])
    grid = context.Grid(1, 0, 1, 0)
    with mlx_flash.patched("blockwise"):
        expected, expected_n = default_loss(model, tokens, lengths)
        loss, n = context.training_loss(grid)(model, tokens, lengths)
        val, val_n = context.evaluation_loss(grid)(model, tokens, lengths)
    assert int(n) == int(expected_n) == int(val_n) == 32 + 16 + 8
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert val.item() == pytest.approx(expected.item(), rel=1e-5)
    with pytest.raises(ValueError, match="asks for an array mask"):
        context.SliceCache(grid, 4).make_mask(4, return_array=True)


SLICE_CASES = [(v, m) for v in ("blockwise", "practical") for m in ("causal", context.Window(6), None)] + [("demo", "causal")]


@pytest.mark.parametrize("variant, mask", SLICE_CASES)
def test_each_slice_attends_at_its_global_offset(variant, mask, monkeypatch):
    # Three slices of 16 of a 48-token row with documents straddling both
    # boundaries, GQA; the gather is replaced by the whole row's keys, so
    # one process checks what each rank computes, the Metal kernels
    # included (through the emulator; demo takes float16 and head dim 64).
    from mlx_flash import emulator, explain, scaled_dot_product_attention

    N, S = 3, 16
    D, dtype, tol = (64, mx.float16, 2e-2) if variant == "demo" else (16, mx.float32, 2e-5)
    mx.random.seed(5)
    q, k, v = (mx.random.normal((1, h, N * S, D)).astype(dtype) for h in (4, 2, 2))
    ids = mx.array([[0] * 11 + [1] * 19 + [2] * 14 + [-1] * 4])
    w = mx.random.normal((1, 4, N * S, D))
    window = {"window": mask.size} if isinstance(mask, context.Window) else {}
    dense = None if mask is None else "causal"
    scale = D**-0.5

    def whole(q, k, v):
        q, k, v = (x.astype(mx.float32) for x in (q, k, v))
        out = scaled_dot_product_attention(q, k, v, scale=scale, mask=dense, segment_ids=ids, variant="manual", **window)
        return (out * w).sum()

    expected = mx.grad(whole, argnums=(0, 1, 2))(q, k, v)
    kv = mx.concatenate([k, v], axis=-1)
    metal = emulator.metal(schedule="forward") if variant != "blockwise" else contextlib.nullcontext()
    with metal:
        for r in range(N):
            rows = slice(r * S, (r + 1) * S)
            cache = context.SliceCache(context.Grid(N, r, 1, 0), S, ids)

            def part(q_r, kv):
                monkeypatch.setattr(context, "gather", lambda x, grid: kv)
                out = context.attention(q_r, k[:, :, rows], v[:, :, rows], cache, scale=scale, mask=mask, variant=variant)
                return (out.astype(mx.float32) * w[:, :, rows]).sum()

            stop = (r + 1) * S if mask else N * S
            ran = explain(q[:, :, rows], k[:, :, :stop], v[:, :, :stop], mask=dense, variant=variant,
                          segment_ids=(ids[:, rows], ids[:, :stop]))  # fmt: skip
            assert ran.implementation == variant, ran
            dq, dkv = mx.grad(part, argnums=(0, 1))(q[:, :, rows], kv)
            np.testing.assert_allclose(np.array(dq.astype(mx.float32)), np.array(expected[0][:, :, rows]), atol=tol)
            total = dkv if r == 0 else total + dkv
    # What the all-sum adds up: the key and value gradients of every slice's
    # queries together are the whole row's.
    total = total.astype(mx.float32)
    np.testing.assert_allclose(np.array(total[..., :D]), np.array(expected[1]), atol=tol)
    np.testing.assert_allclose(np.array(total[..., D:]), np.array(expected[2]), atol=tol)


def test_bench_row_and_verdicts():
    from mlx_flash.bench import context as bench

    tokens, ids, targets = bench.packed_row(300, 50, 40)
    assert tokens.shape == ids.shape == (1, 301) and targets.shape == (1, 300)
    lengths = np.bincount(np.array(ids[0]))
    assert lengths[:-1].min() >= 20 and lengths.max() <= 60  # 0.5x to 1.5x of 40 (the last one cut)
    # A target counts only inside a document.
    assert int(targets.sum()) == 300 - (len(lengths) - 1)
    run = {"loss": 1.0, "wall_s": 2.0, "tokens_per_s": 150.0, "weights_bytes": 2**20, "above_weights_bytes": 10 * 2**20}
    half = dict(run, above_weights_bytes=7 * 2**20)
    result = {"shape": "tiny", "layers": 1, "vocab": 50, "length": 300, "doc_length": 40, "variant": "blockwise",
              "checkpoint": True, "ranks": 2, "single": run, "per_rank": [half, half], "step_time_ratio": 1.0,
              "bytes_per_layer_per_rank": context.traffic(2, 1, 300, 2, 32, 4),
              "targets": {"memory": {"value": 0.7, "target": 0.6, "pass": False},
                          "loss": {"value": 0.0, "target": 1e-5, "pass": True}}}  # fmt: skip
    text = bench.render(result)
    assert "FAIL memory: 0.7 (target at most 0.6)" in text and "PASS loss" in text
    with pytest.raises(SystemExit):
        bench.parse(["--ranks", "1"])


def test_bench_step_with_context_parallel_runs_the_context_bench(monkeypatch):
    from mlx_flash.bench import cli
    from mlx_flash.bench import context as bench

    seen = []
    monkeypatch.setattr(bench, "main", lambda argv: seen.append(argv) or 0)
    assert cli.main(["--step", "--context-parallel", "2", "--seq", "4096", "--layers=3"]) == 0
    assert seen == [["--ranks", "2", "--length", "4096", "--layers=3"]]
    assert cli.main(["--step", "--context-parallel=3", "--seq=1024"]) == 0
    assert seen[-1] == ["--ranks=3", "--length=1024"]
