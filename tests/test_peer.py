"""mlx-train-perf's kernels counted beside ours (``mlx_flash.bench.peer``):
its own launchers on the emulator, the column scaling checked for them, a
wrong output refused, and its column in the cost report."""

import json

import mlx.core as mx
# Installed by `make test` (--no-deps: it pins an older MLX); without it
# these tests fail at import rather than skip.
from mlx_train_perf.attention.kernel import launch

from mlx_flash import emulator
from mlx_flash.bench import cli, cost, cost_report, peer


def test_segments_by_hand():
    seg_id, seg_start = peer.segments(mx.array([[7, 7, 9, 9, 9, 12], [0, 1, 1, 1, 1, 1]], dtype=mx.int32))
    assert seg_id.tolist() == [[0, 0, 1, 1, 1, 2], [0, 1, 1, 1, 1, 1]]
    assert seg_start.tolist() == [[0, 0, 2, 2, 2, 5], [0, 1, 1, 1, 1, 1]]
    assert seg_id.dtype == seg_start.dtype == mx.int32


def test_its_default_and_full_slab_tiles():
    # Its dispatch tables: the D-slab of 128 at D = 128, the builder's own
    # default (None, 32 wide) at D = 64, so full slab differs only there.
    assert peer._tiles("default", 1024, 128) == (("mma", 128),) * 3
    assert peer._tiles("default", 1024, 64) == (("mma", None),) * 3
    problems = peer.problems([cost.Case("demo", 64, 64), cost.Case("demo", 64, 128), cost.Case("demo", 64, 32)])
    assert [(p.head_dim, p.dtype, p.variant) for p in problems] == [
        (64, "float32", "default"), (64, "float32", "full-slab"), (64, "bfloat16", "default"),
        (64, "bfloat16", "full-slab"), (128, "float32", "default"), (128, "bfloat16", "default")]


def test_its_kernels_run_on_the_emulator_and_one_column_scales_to_the_launch():
    problem = peer.Problem(64, 64, "causal+docs16", 4, 2, "bfloat16", "full-slab")
    cells = peer.count(problem)
    assert [c["kernel"] for c in cells] == list(peer.KERNELS)
    by = {c["kernel"]: c for c in cells}
    # Every buffer its kernels read is sorted: q, k, v, dO, o, lse, delta and
    # the gradients as tensors, the document buffers as mask data.
    assert by["forward"]["bytes"]["mask"] > 0 and by["delta"]["bytes"]["mask"] == 0
    names = {name for c in cells for name in c["device_bytes"]}
    assert names - set(peer.TENSOR_BUFFERS) - set(peer.MASK_BUFFERS) <= {
        "qoffs", "scale_in", *(n for n in names if n.endswith(("_shape", "_strides")))}
    # Its forward issues 8x8x8 products only: FLOPs are whole multiples of 1024
    # and at least the bound.
    assert by["forward"]["flops"]["counted"] % 1024 == 0
    assert by["forward"]["flops"]["counted"] >= by["forward"]["flops"]["bound"] > 0
    # The scaled first column equals the whole launch, counter by counter.
    case = problem.case()
    mask = cost.structured_mask(case)
    q, k, v, _ = cost.inputs(case)
    seg_id, seg_start = peer.segments(mask.q_segments)

    def forward():
        mx.eval(*launch.launch_flash_fwd(q, k, v, scale=0.125, causal=True, tile=launch.TileShape(variant="mma"),
                                          seg_id=seg_id, seg_start=seg_start))

    with peer._kernels_on_emulator():
        (column,) = cost.profile_launches(forward)
        with emulator.metal(schedule="forward", profile=True) as session:
            forward()
    totals, factor = cost.scaled_totals(column)
    assert factor == 4 and totals == session.profiles[0].totals


def test_a_wrong_output_is_refused():
    problem = peer.Problem(32, 64, "causal", 2, 2, "float32")
    case = problem.case()
    q, k, v, dout = cost.inputs(case)
    mask = cost.structured_mask(case)
    expected = peer._reference(q, k, v, dout, 0.125, mask)
    out, (dq, dk, dv) = expected
    delta = mx.sum(dout * out[:, :1], axis=-1)
    right = {"forward": out, "delta": delta, "dq": dq, "dk": dk, "dv": dv}
    assert peer.correct(right, expected, delta, mx.float32) is None
    wrong = {**right, "dv": dv.at[0, 0, 5, 3].add(0.5)}
    assert peer.correct(wrong, expected, delta, mx.float32).startswith("dv: max error 0.5")


def test_the_cost_report_sets_it_beside_ours(tmp_path):
    out = tmp_path / "cost"
    assert cli.main(["--cost", "--seq", "32", "--head-dim", "64", "--heads", "2", "--mask", "causal",
                     "--variants", "demo", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["peer"]["version"] == peer.version() and not results["peer"]["failed"]
    assert [(c["dtype"], c["variant"], c["kernel"]) for c in results["peer"]["cells"]] == [
        (d, v, k) for d in peer.DTYPES for v in peer.VARIANTS for k in peer.KERNELS]
    target = results["targets"][-1]
    assert target["name"] == cost_report.PEER_TARGET and target["status"] in ("PASS", "FAIL")
    assert target["detail"].startswith("3 kernels, demo ÷ theirs")
    text = (out / "report.md").read_text()
    assert "## Against mlx-train-perf" in text
    assert "| 64 | 32 | causal | 2/2 | forward | demo float32 |" in text


def test_the_peer_target_by_hand():
    ours = {"family": "demo", "dtype": "float32", "kernel": "dq", "head_dim": 64, "seq": 32, "mask": "causal",
            "q_heads": 2, "kv_heads": 2, "bytes": {"tensor": 300}}
    theirs = {**ours, "variant": "default", "full_slab": False, "bytes": {"tensor": 200}}
    slab = {**theirs, "variant": "full-slab", "full_slab": True, "bytes": {"tensor": 250}}
    assert cost_report.evaluate_peer([ours], None)["status"] == "NOT MEASURED"
    assert cost_report.evaluate_peer([ours], {"cells": [theirs]})["status"] == "NOT MEASURED"
    failed = cost_report.evaluate_peer([ours], {"cells": [theirs, slab]})
    assert failed["status"] == "FAIL" and "1.2" in failed["detail"]
    assert cost_report.evaluate_peer([{**ours, "bytes": {"tensor": 250}}], {"cells": [slab]})["status"] == "PASS"
