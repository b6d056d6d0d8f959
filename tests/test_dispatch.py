"""Watchdog-safe launches (``mlx_flash.dispatch``): a launch split into
pieces gives the whole launch's results bit for bit.

The split runs through the emulator under two thread schedules with race
detection (``kernel_checks.on_backend``); ``MLX_FLASH_MAX_DISPATCH_MS`` set
tiny puts every tile in its own piece, so the split points fall inside
documents, windows and the GQA groups' query tiles.
"""

import mlx.core as mx
import numpy as np
import pytest

from kernel_checks import BACKENDS, on_backend, random_inputs, run_kernels, segment_layout, structured
from mlx_flash import demo, dispatch, emulator, families, masks, practical

#: Two schedules: threads forward, and one SIMD group at a time running
#: ahead (races between SIMD groups change results under the second).
SCHEDULES = ("forward", "ahead-reverse")


def _bits(x: mx.array) -> np.ndarray:
    x = x.astype(mx.float32) if x.dtype == mx.bfloat16 else x
    return np.array(x).view(np.uint8)


def _run(family, q, k, v, dout, mask, sinks, backend, monkeypatch, budget):
    if budget is None:
        monkeypatch.delenv(dispatch.BUDGET_ENV, raising=False)
    else:
        monkeypatch.setenv(dispatch.BUDGET_ENV, budget)
    with on_backend(backend, schedule=SCHEDULES):
        out, lse, grads = run_kernels(family, q, k, v, dout, q.shape[-1] ** -0.5, mask, sinks)
    return [out, lse, *grads]


# (module, B, Hq, Hkv, Lq, Lk, D, dtype, segments, window, sinks)
CASES = [
    (demo, 1, 4, 2, 70, 70, 64, mx.float16, "many", None, True),
    (demo, 2, 2, 1, 45, 45, 64, mx.bfloat16, None, 20, False),
    (practical, 1, 4, 1, 37, 37, 32, mx.float32, "spanning", 9, True),
    (practical, 1, 2, 2, 40, 57, 64, mx.float16, None, None, False),
]


def _id(case):
    module, B, n_q, n_kv, q_len, k_len, dim, dtype, segments, window, sinks = case
    name = module.__name__.split(".")[-1]
    return f"{name}-B{B}-G{n_q // n_kv}-Lq{q_len}-Lk{k_len}-D{dim}-{segments}-w{window}-s{int(sinks)}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_split_launch_is_bit_identical(backend, case, monkeypatch):
    module, B, n_q, n_kv, q_len, k_len, dim, dtype, segments, window, with_sinks = case
    q, k, v, dout = random_inputs(B, n_q, n_kv, q_len, k_len, dim, dim, dtype, seed=q_len)
    ids = None
    if segments:
        ids = mx.array(segment_layout(segments, B, q_len, seed=3)) if q_len == k_len else None
    causal = "causal" if (window or q_len <= k_len) else None
    mask = structured(q_len, k_len, causal, ids, window)
    sinks = mx.array(np.linspace(-1, 1, n_q), dtype=mx.float32) if with_sinks else None

    family = families.get(module.__name__.split(".")[-1])
    tiles = {stage: family.dispatch_tiles(stage, q, k, v) for stage in ("forward", "dq", "dkdv")}
    monkeypatch.setenv(dispatch.BUDGET_ENV, "1e-9")
    splits = {s: dispatch.split(s, family.name, q, k, v, mask, *t) for s, t in tiles.items()}
    for stage, split in splits.items():
        # One piece per tile: every tile boundary is a split point.
        assert len(split.pieces) == split.tiles > 1, (stage, split)
        assert split.pieces == tuple((t, t + 1) for t in range(split.tiles))

    whole = _run(family, q, k, v, dout, mask, sinks, backend, monkeypatch, None)
    pieces = _run(family, q, k, v, dout, mask, sinks, backend, monkeypatch, "1e-9")
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv", "dsinks"), whole, pieces):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert np.array_equal(_bits(a), _bits(b)), f"{name} differs between the whole and the split launch"


@pytest.mark.parametrize("family_name, dtype, kind", [("demo", mx.float16, "bool"), ("practical", mx.float32, "additive")])
def test_head_ranges_slice_a_per_head_mask_array(family_name, dtype, kind, monkeypatch):
    # A mask array with a query-head axis and sinks: each range of KV heads
    # must get its own query heads' rows of both, or the split would differ.
    B, n_q, n_kv, L, dim = 1, 4, 2, 40, 64
    q, k, v, dout = random_inputs(B, n_q, n_kv, L, L, dim, dim, dtype, seed=5)
    rng = np.random.default_rng(7)
    keep = rng.random((B, n_q, L, L)) < 0.7
    keep[..., 0] = True
    array = mx.array(keep) if kind == "bool" else mx.array(np.where(keep, 0.0, -3.0).astype(np.float32))
    mask = structured(L, L, array)
    sinks = mx.array(np.linspace(-1, 1, n_q), dtype=mx.float32)
    family = families.get(family_name)
    monkeypatch.setenv(dispatch.BUDGET_ENV, "1e-9")
    tiles = family.dispatch_tiles("forward", q, k, v)
    assert dispatch.head_pieces("forward", family.name, q, k, v, mask, *tiles) == ((0, 1), (1, 2))
    whole = _run(family, q, k, v, dout, mask, sinks, "emulator", monkeypatch, None)
    pieces = _run(family, q, k, v, dout, mask, sinks, "emulator", monkeypatch, "1e-9")
    for name, a, b in zip(("out", "lse", "dq", "dk", "dv", "dsinks"), whole, pieces):
        assert np.array_equal(_bits(a), _bits(b)), f"{name} differs between the whole and the split launch"


def test_pieces_stay_within_the_budget():
    assert dispatch.pieces_of([1, 1, 1, 1], 2) == ((0, 2), (2, 4))
    assert dispatch.pieces_of([3, 1, 1], 2) == ((0, 1), (1, 3))  # a tile over the budget is alone
    assert dispatch.pieces_of([0.5] * 3, 10) == ((0, 3),)
    costs = [0.3, 0.9, 0.2, 0.2, 0.7, 0.1]
    runs = dispatch.pieces_of(costs, 1.0)
    assert [i for a, b in runs for i in range(a, b)] == list(range(len(costs)))
    assert all(sum(costs[a:b]) <= 1.0 for a, b in runs)


def test_tile_pairs_count_the_causal_and_window_bands():
    # 64 queries, 64 keys, tiles of 16 against 16: causal query tile t sees
    # key tiles 0..t; a window of 16 at most two key tiles.
    assert dispatch.tile_pairs("forward", 16, 16, 64, 64, True, 0) == tuple(256 * (t + 1) for t in range(4))
    assert dispatch.tile_pairs("forward", 16, 16, 64, 64, False, 0) == (1024,) * 4
    assert dispatch.tile_pairs("forward", 16, 16, 64, 64, True, 16) == (256, 512, 512, 512)
    # dK/dV: key tile t is seen by query tiles t..3.
    assert dispatch.tile_pairs("dkdv", 16, 16, 64, 64, True, 0) == tuple(256 * (4 - t) for t in range(4))
    # Lq < Lk: the causal diagonal is bottom-right aligned.
    assert dispatch.tile_pairs("forward", 8, 8, 8, 32, True, 0) == (8 * 32,)


def test_budget_and_explain(monkeypatch):
    q = mx.zeros((1, 8, 4096, 128), mx.float16)
    mask = masks.build(4096, 4096, "causal")
    tiles = lambda stage: demo.dispatch_tiles(stage, q, q, q)  # noqa: E731
    monkeypatch.setenv(dispatch.BUDGET_ENV, "1e9")
    assert "forward 1 piece of 128 tiles" in dispatch.describe("demo", tiles, q, q, q, mask)
    monkeypatch.setenv(dispatch.BUDGET_ENV, "20")
    split = dispatch.split("forward", "demo", q, q, q, mask, *tiles("forward"))
    assert 1 < len(split.pieces) < split.tiles
    assert all(s <= 20e-3 for s in split.seconds)
    text = dispatch.describe("demo", tiles, q, q, q, mask)
    assert f"forward {len(split.pieces)} pieces of 128 tiles" in text and "budget 20 ms" in text
    for bad in ("0", "-3", "soon", "inf"):
        monkeypatch.setenv(dispatch.BUDGET_ENV, bad)
        with pytest.raises(ValueError, match=dispatch.BUDGET_ENV):
            dispatch.budget_ms()


def test_explain_reports_the_pieces(monkeypatch):
    import mlx_flash

    q = mx.zeros((1, 4, 256, 64), mx.float16)
    monkeypatch.setenv(dispatch.BUDGET_ENV, "1e-9")
    with emulator.metal(schedule="forward"):
        plan = mlx_flash.explain(q, q, q, mask="causal", variant="demo")
    # One KV head per range (4 ranges), each cut at every one of its 8 tiles.
    assert "forward 32 pieces (4 ranges of up to 1 KV head, each in pieces of its 8 tiles)" in str(plan), str(plan)
    assert "dK/dV 32 pieces (4 ranges" in str(plan), str(plan)


def test_a_64k_row_is_cut_by_heads_until_every_tile_fits(monkeypatch):
    # 32 query heads over 8 KV heads, D = 128, float16, at the default budget
    # and rate: one tile across all heads is over the budget, one KV group's
    # is not, so the launches run over ranges of KV heads, each cut by tiles.
    monkeypatch.delenv(dispatch.BUDGET_ENV, raising=False)
    L = 65536
    q = mx.zeros((1, 32, L, 128), mx.float16)
    k = mx.zeros((1, 8, L, 128), mx.float16)
    mask = masks.build(L, L, "causal")
    budget = dispatch.budget_ms() / 1e3
    for stage in ("forward", "dq", "dkdv"):
        tiles = demo.dispatch_tiles(stage, q, k, k)
        assert max(dispatch.split(stage, "demo", q, k, k, mask, *tiles).seconds) > budget
        ranges = dispatch.head_pieces(stage, "demo", q, k, k, mask, *tiles)
        assert 1 < len(ranges) <= 8 and ranges[0][0] == 0 and ranges[-1][1] == 8
        assert all(a == b for (_, a), (b, _) in zip(ranges, ranges[1:]))  # contiguous, no gap
        for a, b in ranges:
            piece = dispatch.split(stage, "demo", q[:, 4 * a:4 * b], k[:, a:b], k[:, a:b], mask, *tiles)
            assert max(piece.seconds) <= budget, (stage, a, b)
    text = dispatch.describe("demo", lambda s: demo.dispatch_tiles(s, q, k, k), q, k, k, mask)
    assert "ranges of up to" in text and "over the budget" not in text


def test_rate_comes_from_the_doctors_slowest_timing(monkeypatch):
    from mlx_flash import kernels, verdicts

    # Two causal rows for demo (fwd+bwd) and one of another mask kind,
    # whose pairs the position rules do not give: it is not used.
    def row(kind, seq, seconds, dtype="float16"):
        return {"mode": "fwdbwd", "kind": kind, "dtype": dtype, "head_dim": 64, "value_dim": 64,
                "seq": seq, "batch": 1, "heads": 2, "median_s": {"demo": seconds, "mlx": 1e-9}}

    timings = [row("causal", 1024, 0.01), row("causal", 2048, 0.02), row("causal+segments", 2048, 1e-6)]
    monkeypatch.setattr(kernels, "backend", lambda: "metal")
    monkeypatch.setattr(verdicts, "current", lambda backend: verdicts.Verdict({}, {}, timings))
    flops_per_pair = sum(dispatch.flops_per_pair(s, 64, 64) for s in ("forward", "dq", "dkdv"))
    slowest = min(2 * L * (L + 1) / 2 * flops_per_pair / t for L, t in ((1024, 0.01), (2048, 0.02)))
    rate, source = dispatch.rate("demo", mx.float16)
    assert rate == pytest.approx(slowest / dispatch.SAFETY) and "doctor" in source
    # No timing of this family: the default.
    assert dispatch.rate("practical", mx.float16) == (dispatch.DEFAULT_RATES["practical"],
                                                       "default rate: no doctor timing of this family")
    monkeypatch.setattr(verdicts, "current", lambda backend: None)
    assert dispatch.rate("demo", mx.float16)[0] == dispatch.DEFAULT_RATES["demo"]


def test_launch_runs_each_piece_from_its_first_tile_and_ends_its_command_buffer(monkeypatch):
    from mlx_flash import kernels

    calls, commits = [], []

    def launch(kernel, **call):
        # Each piece's rows hold the first tile it was given (params[9]).
        calls.append(call)
        return [mx.full(call["output_shapes"][0], call["inputs"][9][9].item(), mx.int32)]

    monkeypatch.setattr(kernels, "launch", launch)
    monkeypatch.setattr(kernels, "backend", lambda: "metal")
    monkeypatch.setattr(mx, "async_eval", lambda *arrays: commits.append(arrays))
    plan = dispatch.Split("forward", ((0, 2), (2, 3)), (0.1, 0.1), tiles=3, rows=16)
    inputs = [mx.zeros((1,))] * 9 + [mx.array([40, 40, 2, 2, 0, 1, 0, 0, 0, 0], mx.int32), mx.zeros((1,))]
    (out,) = dispatch.launch("kernel", plan, inputs=inputs, grid=(3 * 128, 2, 1), threadgroup=(128, 1, 1),
                             output_shapes=[(1, 2, 40, 8)], output_dtypes=[mx.int32])
    assert [c["grid"] for c in calls] == [(256, 2, 1), (128, 2, 1)]
    assert [c["output_shapes"][0] for c in calls] == [(1, 2, 32, 8), (1, 2, 8, 8)]
    assert [c["inputs"][9][:9].tolist() for c in calls] == [[40, 40, 2, 2, 0, 1, 0, 0, 0]] * 2
    assert out.shape == (1, 2, 40, 8)
    assert out[:, :, :32].max().item() == 0 and out[:, :, 32:].min().item() == 2
    assert len(commits) == 2  # outside a transformation every piece is committed

    # Inside mx.grad and mx.compile MLX refuses async_eval: the pieces still run.
    def refuse(*arrays):
        raise ValueError("[async_eval] Not allowed inside a graph transformation.")

    monkeypatch.setattr(mx, "async_eval", refuse)
    calls.clear()
    dispatch.launch("kernel", plan, inputs=inputs, grid=(3 * 128, 2, 1), threadgroup=(128, 1, 1),
                    output_shapes=[(1, 2, 40, 8)], output_dtypes=[mx.int32])
    assert len(calls) == 2
