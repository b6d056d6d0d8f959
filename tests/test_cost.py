"""The cost report on tiny shapes: the FlashAttention-2 bounds on hand-computed
cases, the kernels' counted events against hand-derived numbers, the exact
scaling from one grid column to the whole launch, and the report written by
``python -m mlx_flash.bench --cost``."""

import json
import os

import mlx.core as mx
import pytest

from mlx_flash import demo, masks
from mlx_flash.bench import bounds, cli, cost, cost_report
from mlx_flash.call import AttentionCall


def _ids(*runs):
    """(1, L) int32 ids: document d repeated runs[d] times."""
    return mx.array([[d for d, n in enumerate(runs) for _ in range(n)]], dtype=mx.int32)


CAUSAL8 = masks.build(8, 8, "causal")
PACKED8 = masks.build(8, 8, "causal", segment_ids=_ids(4, 4))


# ------------------------------------------------------------------ bounds --


def test_kept_pairs_by_hand():
    assert bounds.kept_pairs(CAUSAL8) == 36  # 1 + 2 + ... + 8
    assert bounds.kept_pairs(masks.build(8, 8, "causal", segment_ids=_ids(3, 2, 3))) == 6 + 3 + 6
    assert bounds.kept_pairs(masks.build(8, 8, None, segment_ids=_ids(3, 2, 3))) == 9 + 4 + 9
    assert bounds.kept_pairs(masks.build(5, 5, "causal", window=2)) == 1 + 2 + 2 + 2 + 2
    assert bounds.kept_pairs(masks.build(3, 5, "causal")) == 3 + 4 + 5  # bottom-right
    assert bounds.kept_pairs(CAUSAL8, batch=2) == 72
    padded = mx.array([[0, 0, -1, 1, 1, -1]], dtype=mx.int32)
    assert bounds.kept_pairs(masks.build(6, 6, "causal", segment_ids=padded)) == 3 + 3


def test_documents_must_be_contiguous():
    with pytest.raises(ValueError, match="contiguous"):
        bounds.kept_pairs(masks.build(4, 4, "causal", segment_ids=mx.array([[0, 1, 0, 1]], dtype=mx.int32)))


def test_seen_per_tile_by_hand():
    query, key = bounds.Tiling("query", 4, 2, 1), bounds.Tiling("key", 4, 2, 1)
    assert bounds.seen_per_tile(CAUSAL8, query).tolist() == [4, 8]
    assert bounds.seen_per_tile(CAUSAL8, key).tolist() == [8, 4]
    # Documents of 3 and 5 tokens: rows 0-3 see keys 0-2 and 3; rows 4-7 keys 3-7;
    # keys 0-3 are seen by rows 0-2 (doc 0) and 3-7 (key 3); keys 4-7 by rows 4-7.
    packed = masks.build(8, 8, "causal", segment_ids=_ids(3, 5))
    assert bounds.seen_per_tile(packed, query).tolist() == [4, 5]
    assert bounds.seen_per_tile(packed, key).tolist() == [8, 4]


def test_bound_flops_and_bytes_by_hand():
    # B=1, Hq=2, Hkv=1, L=8, D=Dv=4, 2-byte elements, causal.
    p = bounds.Problem(1, 2, 1, 8, 8, 4, 4, 2)
    assert bounds.bound_flops("forward", p, 36) == 2 * 36 * 2 * (4 + 4)
    assert bounds.bound_flops("dkdv", p, 36) == 2 * 36 * 2 * 16
    assert bounds.bound_flops("dq", p, 36) == 2 * 36 * 2 * 12
    # q, o: 2*8*4*2 = 128 bytes each; k, v, dk, dv: 64; lse, delta: 64.
    forward = bounds.bound_bytes("forward", p, CAUSAL8, bounds.Tiling("query", 4, 2, 2))
    assert forward == {"minimum": 128 + 64 + 64 + 128 + 64,
                       "tiling": 128 + 128 + 64 + (4 + 8) * 1 * (4 + 4) * 2}
    # One head per threadgroup: each of the two heads' columns reads K/V.
    assert bounds.bound_bytes("forward", p, CAUSAL8, bounds.Tiling("query", 4, 2, 1))["tiling"] == (
        320 + (4 + 8) * 2 * 16)
    dkdv = bounds.bound_bytes("dkdv", p, CAUSAL8, bounds.Tiling("key", 4, 2, 2))
    assert dkdv == {"minimum": 128 + 64 + 64 + 128 + 64 + 64 + 64 + 64,
                    "tiling": 4 * 64 + (8 + 4) * 2 * ((4 + 4) * 2 + 8)}
    dq = bounds.bound_bytes("dq", p, CAUSAL8, bounds.Tiling("query", 4, 2, 2))
    assert dq["tiling"] == 128 + 128 + 64 + 64 + 128 + 12 * 16


def test_visits_follow_the_kernels_loops():
    query, key = bounds.Tiling("query", 4, 2, 1), bounds.Tiling("key", 4, 2, 2)
    # Query tiles: rows 0-3 visit key tiles [0, 2), [2, 4); rows 4-7 four of them.
    assert cost.visits(CAUSAL8, query) == 2 + 4
    # Key tiles (x2 heads): keys 0-3 visit every row tile, keys 4-7 the last two.
    assert cost.visits(CAUSAL8, key) == (4 + 2) * 2
    assert cost.visits(CAUSAL8, query, batch=3) == 3 * (2 + 4)
    # Two documents of 4: rows 4-7 skip the key tiles of document 0.
    assert cost.visits(PACKED8, query) == 2 + 2
    assert cost.evaluated_pairs(PACKED8, query, q_heads=2) == 4 * 4 * 2 * 2
    # A window of 2: rows 4-7 see keys 3-7, key tiles from [2, 4).
    assert cost.visits(masks.build(8, 8, "causal", window=2), query) == 2 + 3


def test_practical_alu_by_hand():
    c = {"kernel": "forward", "mask": "causal", "evaluated_pairs": 100,
         "math": {"exp2": 110, "log": 2}, "collectives": {"simd_any": 50, "simd_shuffle_xor": 1}}
    a = cost.practical_alu(c)
    assert a["math"] == pytest.approx(1.12)
    assert a["collectives"] == pytest.approx(32 * 51 / 100)
    assert a["butterfly"] == pytest.approx(0.32)
    assert a["code"] == pytest.approx(11 + 5 * 0.1)
    assert a["ratio"] == pytest.approx((1.12 + 16.32 + 0.32 + 11.5) / 8)
    c.update(kernel="dq", mask="causal+docs512", math={"exp2": 100})
    assert cost.practical_alu(c)["total"] == pytest.approx(1 + 16.32 + 0.32 + 12)


# ------------------------------------------------------------ counted events --


def test_demo_forward_counts_by_hand():
    # D=64, L=32, Hq=2 sharing one KV head: one threadgroup of 8 SIMD groups
    # (32 rows of each head, tiles (32, 32)), one key tile.
    case = cost.Case("demo", 32, 64, "causal", q_heads=2, kv_heads=1)
    forward = cost.count(case)[0]
    assert forward["threadgroups"] == {"counted": 1, "launch": 1, "factor": 1}
    # S and O: per head (32/8) x (32/8) fragments x 64/8 steps each.
    assert forward["simdgroup_matrix"]["multiply_accumulate"] == 2 * 2 * 4 * 4 * 8
    assert forward["flops"]["counted"] == forward["flops"]["issued"] == 2 * (2 * 32 * 32) * 64 * 2
    assert forward["device_bytes"]["q"] == [2 * 32 * 64 * 2, 0]
    assert forward["device_bytes"]["k"] == [32 * 64 * 2, 0]  # staged once for both heads
    assert forward["device_bytes"]["out"] == [0, 2 * 32 * 64 * 2]
    assert forward["device_bytes"]["lse"] == [0, 2 * 32 * 4]
    # A weight per pair of the tile and a correction per lane; a log per row.
    assert forward["math"] == {"exp2": 2 * 32 * 32 + 256, "log": 64}
    # Q staged per head (2 barriers each), then the key tile (2).
    assert forward["barriers"] == {"threadgroup": 2 * 2 + 2}
    assert forward["threadgroup_peak_bytes"] == demo.TILES[64].threadgroup_bytes(64)["forward"] == 9344
    assert forward["bytes"]["tensor"] == forward["bytes"]["tiling"]


def test_practical_forward_counts_by_hand():
    # float32, D=32: 4 simdgroups of 8 rows, 16-key tiles (2 lane-rows, 4 rows
    # per lane), one head: L=16 fills simdgroups 0 and 1; 2 and 3 are padding.
    case = cost.Case("practical", 16, 32, "causal", q_heads=1, kv_heads=1)
    forward = cost.count(case)[0]
    assert forward["tiles"].startswith("NSG/R/BK 4/8/16")
    # One key tile: a weight per lane and row slot (128 x 4), and the first
    # tile's rescale (a correction per slot) in the two simdgroups whose
    # rows see a finite score; the padding rows' scores are all -inf.
    assert forward["math"] == {"exp2": 128 * 4 + 64 * 4, "log": 16}
    # simd_any once per simdgroup; the rescale's group max (4 shuffles per
    # slot, 2 simdgroups) and the final row sum and kept flag (8 per slot).
    # Besides: the metadata, read once per simdgroup by lane 0 and broadcast
    # (params 10, the scale 1, q, k and v strides 12; see flash_uniform).
    assert forward["collectives"] == {
        "simd_any": 4,
        "simd_shuffle_xor": 2 * 4 * 4 + 4 * 4 * 8,
        "simd_broadcast": 4 * (10 + 1 + 12),
    }
    assert forward["device_bytes"]["k"] == [16 * 32 * 4, 0]
    assert forward["device_bytes"]["o"] == [0, 16 * 32 * 4]


def test_metadata_is_read_once_per_simdgroup():
    # D=64, L=32, Hq=2 sharing one KV head: one threadgroup of 8 SIMD groups.
    # Every uniform value is loaded by one lane of each SIMD group, once;
    # the array mask's shape and strides not at all (there is none).
    case = cost.Case("demo", 32, 64, "causal+docs16", q_heads=2, kv_heads=1)
    forward = cost.count(case)[0]
    metadata = {n: v for n, v in forward["device_bytes"].items() if cost.buffer_class(n) == "metadata"}
    int64, groups = 8, 8
    assert metadata == {
        "params": [groups * 10 * 4, 0],
        "fparams": [groups * 4, 0],
        **{f"{n}_strides": [groups * 4 * int64, 0] for n in ("q", "k", "v")},
        **{f"{n}_strides": [groups * 2 * int64, 0] for n in ("q_segments", "k_segments")},
        **{f"{n}_strides": [groups * 3 * int64, 0] for n in ("q_ranges", "k_ranges")},
    }
    # The query tile's id range (2) and, for its one key tile, the running
    # bound and the range (3): int32 each, once per SIMD group.
    assert forward["device_bytes"]["q_ranges"] == [groups * 2 * 4, 0]
    assert forward["device_bytes"]["k_ranges"] == [groups * 3 * 4, 0]


@pytest.mark.parametrize("family, bound", [("demo", 0.10), ("practical", 0.25)])
def test_mask_and_metadata_bytes_stay_small_beside_tensor_bytes(family, bound):
    # Packed documents: per-tile id bounds are read once per tile and SIMD
    # group, the key (query) tile's ids once per tile.
    case = cost.Case(family, 256, 64, "causal+docs64", q_heads=4, kv_heads=2)
    for cell in cost.count(case):
        ratio = cost_report.mask_metadata_ratio(cell)
        assert 0 < ratio <= bound, (cell["kernel"], cell["bytes"])


def _practical_forward_cell(case, q, k, v):
    mask = cost.structured_mask(case)
    scale = case.head_dim ** -0.5
    (profile,) = cost.profile_launches(lambda: mx.eval(cost.families.get("practical").forward(AttentionCall(q, k, v, scale, mask, None))))
    tiling, text, registers, declared = cost.kernel_tiling(case, "forward")
    return cost.cell(case, "forward", profile, tiling, mask, text, registers, declared, seconds=0.0)


def test_practical_forward_rescales_depend_on_the_scores():
    # The lazy maximum rescales a simdgroup's rows only when a score passes
    # a row's maximum by more than the slack. float32, D=64: 4 simdgroups of
    # 8 rows, 8-key tiles, each lane one key of one row (RL = 1).
    L, dim = 256, 64
    case = cost.Case("practical", L, dim, "causal", q_heads=1, kv_heads=1)
    assert _practical_forward_cell(case, *cost.inputs(case)[:3])["tiles"].startswith("NSG/R/BK 4/8/8")
    pairs = sum(32 * 8 for t in range(L // 32) for _ in range(0, 32 * t + 32, 8))

    # Seeded normal scores: after a row's first tiles almost nothing passes.
    normal = _practical_forward_cell(case, *cost.inputs(case)[:3])
    assert normal["evaluated_pairs"] == pairs
    assert pairs < normal["math"]["exp2"] < 1.1 * pairs
    assert cost.practical_alu(normal)["ratio"] <= 2.0

    # Scores that rise by 9 (> the slack, 8) at every key the walk reaches
    # (key tiles from the diagonal down): every (simdgroup, key tile) that
    # keeps a key rescales, one correction exp per lane and row besides the
    # weight's; a simdgroup whose rows all end before the tile keeps none.
    first = mx.zeros((1, 1, L, dim)).at[..., 0].add(1.0)
    rising = first * ((L - mx.arange(L, dtype=mx.float32)) * 9.0 * dim ** 0.5)[None, None, :, None]
    worst = _practical_forward_cell(case, first, rising, cost.inputs(case)[2])
    rescaling = sum(8 * 8 for t in range(L // 32) for k0 in range(0, 32 * t + 32, 8)
                    for sg in range(4) if k0 <= 32 * t + 8 * sg + 7)
    assert worst["math"]["exp2"] == pairs + rescaling
    assert 2.0 < cost.practical_alu(worst)["ratio"] < 3.5


@pytest.mark.parametrize("family", ["practical", "demo"])
def test_one_grid_column_scales_exactly_to_the_launch(family):
    case = cost.Case(family, 48, 64, "causal+docs16", q_heads=4, kv_heads=2)
    mask = cost.structured_mask(case)
    q, k, v, dout = cost.inputs(case)
    scale = 0.125
    lse, delta = cost.backward_inputs(AttentionCall(q, k, v, scale, mask), dout)
    module = cost.families.get(family)
    run = lambda: (mx.eval(module.forward(AttentionCall(q, k, v, scale, mask, None))),  # noqa: E731
                   mx.eval(module.dkdv(AttentionCall(q, k, v, scale, mask, None, dout, lse, delta))),
                   mx.eval(module.dq(AttentionCall(q, k, v, scale, mask, None, dout, lse, delta))))
    columns = cost.profile_launches(run)
    with cost.emulator.metal(schedule="forward", profile=True) as session:
        run()
    for column, whole in zip(columns, session.profiles):
        totals, factor = cost.scaled_totals(column)
        assert factor > 1
        assert totals == whole.totals


# ------------------------------------------------------------------ report --


def test_cost_report_is_written(tmp_path, capsys):
    out = tmp_path / "cost"
    status = cli.main(["--cost", "--seq", "32", "--head-dim", "64", "--heads", "2", "--kv-heads", "1",
                       "--variants", "demo", "--no-peer", "--out", str(out)])
    assert status == 0
    results = json.loads((out / "results.json").read_text())
    assert results["schema"] == cost_report.SCHEMA and results["peer"] is None
    assert [(c["dtype"], c["kernel"], c["mask"]) for c in results["cells"]] == [
        (d, k, m) for d in ("float16", "float32") for m in cost.MASKS for k in cost.KERNELS]
    statuses = [t["status"] for t in results["targets"]]
    assert statuses == ["NOT MEASURED", "NOT MEASURED", "PASS", "PASS", "NOT MEASURED", "PASS", "PASS",
                        "NOT MEASURED"]
    text = (out / "report.md").read_text()
    assert "Counted by the CPU emulator: exact counts of what the kernels issue, not Metal timings." in text
    assert "| demo | float16 | forward | 64 | 32 | causal | 2/1 |" in text
    assert "| demo | float32 | forward | 64 | 32 | causal | 2/1 |" in text
    assert "Against mlx-train-perf" not in text
    assert "PASS" in capsys.readouterr().out
    # An existing report is kept unless --overwrite.
    assert cli.main(["--cost", "--seq", "32", "--head-dim", "64", "--variants", "demo", "--no-peer",
                     "--out", str(out)]) == 2
    # --render draws the same report from results.json alone, its targets evaluated again.
    again = tmp_path / "again"
    assert cli.main(["--render", str(out / "results.json"), "--out", str(again)]) == 0
    assert (again / "report.md").read_text() == text
    assert cli.main(["--render", str(out / "results.json"), "--targets", "--out", str(again), "--overwrite"]) == 2
    assert "has its own targets" in capsys.readouterr().err


def test_cost_targets_fail_above_their_bound():
    cell = {"family": "demo", "kernel": "forward", "head_dim": 128, "mask": "causal", "seq": 4096,
            "q_heads": 8, "kv_heads": 8, "bytes": {"tensor": 160, "tiling": 100, "mask": 4, "metadata": 16},
            "threadgroup_peak_bytes": 20000, "dtype": "float16", "flops": {"issued": 4096, "counted": 4096}}
    wide = {**cell, "dtype": "float32", "threadgroup_peak_bytes": 30000, "flops": {"issued": 4096, "counted": 2048}}
    results = cost_report.evaluate([cell, wide])
    assert [r["status"] for r in results] == ["FAIL", "NOT MEASURED", "FAIL", "FAIL", "NOT MEASURED", "FAIL",
                                              "FAIL", "NOT MEASURED"]
    assert "1.6" in results[0]["detail"] and "0.125" in results[3]["detail"] and "20,000" in results[5]["detail"]
    assert "over: demo forward D=128 L=4096 causal H=8/8 float32 2,048" in results[2]["detail"]
    assert "30,000" in results[6]["detail"] and "20,000" not in results[6]["detail"]


@pytest.mark.parametrize("args, message", [
    (["--cost", "--dtype", "float16"], "--dtype: not with --cost"),
    (["--cost", "--variants", "manual"], "--variants: --cost counts"),
    (["--cost", "--mask", "causal+window8"], "not 'causal+window8'"),
    (["--cost", "--head-dim", "32", "--variants", "demo"], "--head-dim: demo takes"),
    (["--cost", "--heads", "8", "--kv-heads", "3"], "--kv-heads: 3 does not divide"),
    (["--before", "x.json"], "--before: only with --cost"),
    (["--no-peer"], "--no-peer: only with --cost"),
])
def test_cost_arguments_are_checked(args, message, capsys, tmp_path):
    assert cli.main(args + ["--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1 and not os.path.exists(tmp_path / "x")


def test_an_interrupted_cost_run_keeps_what_it_counted(tmp_path, monkeypatch):
    count = cost.count
    calls = []

    def interrupt_second(case, seed=0):
        calls.append(case)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return count(case, seed)

    monkeypatch.setattr(cost, "count", interrupt_second)
    out = tmp_path / "cost"
    status = cli.main(["--cost", "--seq", "32", "--head-dim", "64", "--heads", "2", "--variants", "demo",
                       "--no-peer", "--out", str(out)])
    assert status == 130
    results = json.loads((out / "results.json").read_text())
    assert len(results["cells"]) == 3 and results["settings"]["interrupted"] == "after 1 of 4 cases"
    assert "**Interrupted** after 1 of 4 cases" in (out / "report.md").read_text()
