"""The Metal emulator against NumPy on small kernels written for the purpose."""

import re

import mlx.core as mx
import numpy as np
import pytest

import kernel_checks
from conftest import assert_close
from mlx_flash import emulator, oracle
from mlx_flash.families import DEMO, PRACTICAL


def kernel(name, inputs, outputs, source, header="", atomic=False):
    return mx.fast.metal_kernel(
        name=name,
        input_names=inputs,
        output_names=outputs,
        source=source,
        header=header,
        ensure_row_contiguous=False,
        atomic_outputs=atomic,
    )


def np32(x):
    return np.array(x.astype(mx.float32))


# -------------------------------------------------------------- elementwise --

AXPY = kernel(
    "emu_axpy",
    ["x", "y"],
    ["out"],
    """
    uint i = thread_position_in_grid.x;
    if (i >= N) {
        return;
    }
    float a = float(x[i]) * ALPHA + float(y[i]);
    out[i] = T(metal::fast::exp(-a * a) + metal::precise::sqrt(abs(a)));
    """,
)


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
def test_elementwise_with_template(dtype):
    n = 37
    x = mx.random.normal((n,), key=mx.random.key(0)).astype(dtype)
    y = mx.random.normal((n,), key=mx.random.key(1)).astype(dtype)
    (out,) = emulator.run(
        AXPY,
        inputs=[x, y],
        template=[("T", dtype), ("N", n), ("ALPHA", 3)],
        grid=(64, 1, 1),
        threadgroup=(32, 1, 1),
        output_shapes=[(n,)],
        output_dtypes=[dtype],
    )
    assert out.dtype == dtype
    a = np32(x).astype(np.float64) * 3 + np32(y)
    expected = np.exp(-a * a) + np.sqrt(np.abs(a))
    tol = {mx.float32: 1e-5, mx.float16: 2e-3, mx.bfloat16: 1e-2}[dtype]
    np.testing.assert_allclose(np32(out), expected, rtol=tol, atol=tol)


VECTORS = kernel(
    "emu_vectors",
    ["x"],
    ["out"],
    """
    uint i = thread_position_in_grid.x;
    float4 v = float4(x[4 * i], x[4 * i + 1], x[4 * i + 2], x[4 * i + 3]);
    v = load_helper(v);
    float2 s = v.zw + v.xy * 2.0f;          // swizzles read
    float4 w = float4(s.yx, v.w, 1);        // mixed constructor
    w.xz = w.zx;                            // swizzle write
    half4 h = half4(w);
    uint bits = as_type<uint>(float(h.y));
    out[4 * i] = w.x;
    out[4 * i + 1] = metal::max(w.y, numeric_limits<float>::lowest());
    out[4 * i + 2] = dot(w, float4(1.0f)) + float(all(w == w));
    out[4 * i + 3] = float(bits == as_type<uint>(float(h[1])));
    """,
    header="#include <metal_stdlib>\nusing namespace metal;\n"
    "inline float4 load_helper(float4 v) { return v; }\n",
)


def test_vector_types_swizzles_and_builtins():
    x = mx.arange(16, dtype=mx.float32) / 4
    (out,) = emulator.run(
        VECTORS,
        inputs=[x],
        grid=(4, 1, 1),
        threadgroup=(4, 1, 1),
        output_shapes=[(16,)],
        output_dtypes=[mx.float32],
    )
    v = np.array(x).reshape(4, 4)
    s = v[:, 2:4] + v[:, 0:2] * 2
    w = np.stack([s[:, 1], s[:, 0], v[:, 3], np.ones(4)], axis=1)
    w[:, [0, 2]] = w[:, [2, 0]]
    expected = np.stack(
        [w[:, 0], w[:, 1], w.sum(axis=1) + 1, np.ones(4)], axis=1
    ).reshape(-1)
    np.testing.assert_allclose(np.array(out), expected, rtol=1e-6)


# ---------------------------------------------------------------- reductions --

ROW_SUM = kernel(
    "emu_row_sum",
    ["x"],
    ["out"],
    """
    // One threadgroup per row: each thread sums a strided slice, simd_sum
    // within each SIMD group, then the group sums go through threadgroup memory.
    threadgroup float partial[32];
    uint row = threadgroup_position_in_grid.x;
    uint tid = thread_index_in_threadgroup;
    uint lane = thread_index_in_simdgroup;
    uint sg = simdgroup_index_in_threadgroup;
    float acc = 0.0f;
    for (uint j = tid; j < N; j += threads_per_threadgroup.x) {
        acc += x[row * N + j];
    }
    acc = simd_sum(acc);
    if (lane == 0) {
        partial[sg] = acc;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (sg == 0) {
        float p = lane < simdgroups_per_threadgroup ? partial[lane] : 0.0f;
        p = simd_sum(p);
        if (lane == 0) {
            out[row] = p;
        }
    }
    """,
)


def test_simd_sum_threadgroup_reduction():
    rows, n = 3, 1000
    x = mx.random.uniform(shape=(rows, n), key=mx.random.key(2))
    (out,) = emulator.run_checked(
        ROW_SUM,
        inputs=[x],
        template=[("N", n)],
        grid=(rows * 128, 1, 1),
        threadgroup=(128, 1, 1),
        output_shapes=[(rows,)],
        output_dtypes=[mx.float32],
    )
    np.testing.assert_allclose(
        np.array(out), np.array(x).astype(np.float64).sum(axis=1), rtol=1e-5
    )


SHUFFLES = kernel(
    "emu_shuffles",
    ["x"],
    ["total", "down", "prefix", "bcast"],
    """
    uint i = thread_position_in_grid.x;
    float v = x[i];
    // Butterfly all-reduce with simd_shuffle_xor.
    float s = v;
    for (ushort m = 16; m > 0; m >>= 1) {
        s += simd_shuffle_xor(s, m);
    }
    total[i] = s;
    down[i] = simd_shuffle_down(v, 3);
    prefix[i] = simd_prefix_exclusive_sum(v);
    bcast[i] = simd_broadcast(v, 5) + simd_max(v);
    """,
)


@pytest.mark.parametrize("switch", ["registers", "ucontext"])
def test_simd_shuffles_and_prefix(switch, monkeypatch):
    if switch == "ucontext":
        monkeypatch.setenv("MLX_FLASH_EMULATOR_UCONTEXT", "1")
    n = 64
    x = mx.array(np.random.default_rng(0).integers(-8, 8, n).astype(np.float32))
    outs = emulator.run_checked(
        SHUFFLES,
        inputs=[x],
        grid=(n, 1, 1),
        threadgroup=(64, 1, 1),
        output_shapes=[(n,)] * 4,
        output_dtypes=[mx.float32] * 4,
    )
    total, down, prefix, bcast = (np.array(o).reshape(2, 32) for o in outs)
    v = np.array(x).reshape(2, 32)
    np.testing.assert_array_equal(total, np.repeat(v.sum(1, keepdims=True), 32, 1))
    expected_down = v.copy()
    expected_down[:, :29] = v[:, 3:]  # lanes past the end keep their own value
    np.testing.assert_array_equal(down, expected_down)
    np.testing.assert_array_equal(prefix, np.cumsum(v, axis=1) - v)
    np.testing.assert_array_equal(
        bcast, np.repeat((v[:, 5] + v.max(1))[:, None], 32, 1)
    )


# ---------------------------------------------------------- simdgroup_matrix --

MMA = kernel(
    "emu_mma",
    ["a", "b", "c"],
    ["out", "elems"],
    """
    simdgroup_matrix<T, 8, 8> A, B;
    simdgroup_matrix<float, 8, 8> C;
    simdgroup_load(A, a, 8);
    simdgroup_load(B, b, 8, ulong2(0, 0), TRANSPOSE_B);
    simdgroup_load(C, c, 8);
    simdgroup_multiply_accumulate(C, A, B, C);
    simdgroup_store(C, out, 8);
    // thread_elements: each lane's two elements of C, in lane order.
    uint lane = thread_index_in_simdgroup;
    elems[2 * lane] = C.thread_elements()[0];
    elems[2 * lane + 1] = C.thread_elements()[1];
    """,
)


@pytest.mark.parametrize("dtype", [mx.float32, mx.float16, mx.bfloat16])
@pytest.mark.parametrize("transpose", [False, True])
def test_simdgroup_matrix_multiply_accumulate(dtype, transpose):
    rng = np.random.default_rng(3)
    a = mx.array(rng.standard_normal((8, 8)).astype(np.float32)).astype(dtype)
    b = mx.array(rng.standard_normal((8, 8)).astype(np.float32)).astype(dtype)
    c = mx.array(rng.standard_normal((8, 8)).astype(np.float32))
    out, elems = emulator.run_checked(
        MMA,
        inputs=[a, b, c],
        template=[("T", dtype), ("TRANSPOSE_B", transpose)],
        grid=(32, 1, 1),
        threadgroup=(32, 1, 1),
        output_shapes=[(8, 8), (64,)],
        output_dtypes=[mx.float32, mx.float32],
    )
    bb = np32(b).T if transpose else np32(b)
    expected = np32(a).astype(np.float64) @ bb + np32(c)
    np.testing.assert_allclose(np.array(out), expected, rtol=1e-5, atol=1e-5)
    # Lane l holds row (q & 4) + (l / 2) % 4, columns c, c + 1 where
    # c = (q & 2) * 2 + (l % 2) * 2 and q = l / 4.
    lanes = np.arange(32)
    q = lanes // 4
    rows = (q & 4) + (lanes // 2) % 4
    cols = (q & 2) * 2 + (lanes % 2) * 2
    e = np.array(elems).reshape(32, 2)
    np.testing.assert_array_equal(e[:, 0], np.array(out)[rows, cols])
    np.testing.assert_array_equal(e[:, 1], np.array(out)[rows, cols + 1])


# ---------------------------------------------------------- shapes, strides --

STRIDED = kernel(
    "emu_strided",
    ["x", "m"],
    ["out"],
    """
    // out = x + m for any layout of x and m, read through their strides.
    uint i = thread_position_in_grid.x;
    uint r = i / x_shape[1], c = i % x_shape[1];
    float xv = x[r * x_strides[0] + c * x_strides[1]];
    float mv = m[elem_to_loc(i, m_shape, m_strides, m_ndim)];
    out[i] = xv + mv + 1000.0f * float(x_ndim);
    """,
)


def test_shape_strides_ndim_of_broadcast_and_transposed_inputs():
    x = mx.arange(12, dtype=mx.float32).reshape(4, 3).T  # (3, 4), strides (1, 3)
    m = mx.broadcast_to(mx.array([[10.0], [20.0], [30.0]]), (3, 4))  # stride 0
    (out,) = emulator.run(
        STRIDED,
        inputs=[x, m],
        grid=(12, 1, 1),
        threadgroup=(8, 1, 1),
        output_shapes=[(3, 4)],
        output_dtypes=[mx.float32],
    )
    np.testing.assert_array_equal(np.array(out), np.array(x) + np.array(m) + 2000)


GRID_EDGE = kernel(
    "emu_grid_edge",
    [],
    ["out"],
    """
    // Threadgroups at the grid edge are clipped (non-uniform threadgroups).
    uint2 p = thread_position_in_grid.xy;
    uint idx = p.y * threads_per_grid.x + p.x;
    out[3 * idx] = float(threads_per_threadgroup.x * threads_per_threadgroup.y);
    out[3 * idx + 1] = float(threadgroup_position_in_grid.x);
    out[3 * idx + 2] = float(thread_index_in_threadgroup);
    """,
)


def test_grid_not_a_multiple_of_the_threadgroup():
    gx, gy, tx, ty = 10, 3, 4, 2
    (out,) = emulator.run(
        GRID_EDGE,
        inputs=[],
        grid=(gx, gy, 1),
        threadgroup=(tx, ty, 1),
        output_shapes=[(gy, gx, 3)],
        output_dtypes=[mx.float32],
    )
    out = np.array(out)
    px, py = np.meshgrid(np.arange(gx), np.arange(gy))
    width = np.minimum(tx, gx - (px // tx) * tx)
    height = np.minimum(ty, gy - (py // ty) * ty)
    np.testing.assert_array_equal(out[..., 0], width * height)
    np.testing.assert_array_equal(out[..., 1], px // tx)
    np.testing.assert_array_equal(out[..., 2], (py % ty) * width + px % tx)


# --------------------------------------------------- init_value and atomics --

HISTOGRAM = kernel(
    "emu_histogram",
    ["x"],
    ["counts", "sums"],
    """
    uint i = thread_position_in_grid.x;
    int bin = x[i];
    atomic_fetch_add_explicit(&counts[bin], 1, memory_order_relaxed);
    atomic_fetch_add_explicit(&sums[bin], 0.5f * float(i), memory_order_relaxed);
    """,
    atomic=True,
)


def test_atomic_outputs_with_init_value():
    x = mx.array(np.random.default_rng(4).integers(0, 5, 100).astype(np.int32))
    counts, sums = emulator.run_checked(
        HISTOGRAM,
        inputs=[x],
        grid=(100, 1, 1),
        threadgroup=(32, 1, 1),
        output_shapes=[(5,), (5,)],
        output_dtypes=[mx.int32, mx.float32],
        init_value=7,
    )
    xs = np.array(x)
    np.testing.assert_array_equal(np.array(counts), np.bincount(xs, minlength=5) + 7)
    expected = np.bincount(xs, weights=0.5 * np.arange(100), minlength=5) + 7
    np.testing.assert_allclose(np.array(sums), expected, rtol=1e-6)


PARTIAL_WRITE = kernel(
    "emu_partial_write",
    [],
    ["out"],
    """
    uint i = thread_position_in_grid.x;
    if (i % 2 == 0) {
        out[i] = 1.0f;
    }
    """,
)


def test_init_value_fills_unwritten_outputs_and_poison_without_it():
    common = dict(
        inputs=[], grid=(8, 1, 1), threadgroup=(8, 1, 1),
        output_shapes=[(8,)], output_dtypes=[mx.float32],
    )
    (filled,) = emulator.run(PARTIAL_WRITE, init_value=-3, **common)
    np.testing.assert_array_equal(np.array(filled), [1, -3] * 4)
    (poisoned,) = emulator.run(PARTIAL_WRITE, **common)
    assert np.isnan(np.array(poisoned)[1::2]).all()
    assert (np.array(poisoned)[0::2] == 1).all()


# ------------------------------------------------------ races and divergence --

SHIFT = kernel(
    "emu_shift",
    ["x"],
    ["out"],
    """
    // Each thread reads its left neighbour's threadgroup slot.
    threadgroup float buf[64];
    uint t = thread_index_in_threadgroup;
    buf[t] = x[thread_position_in_grid.x];
    if (BARRIER) {
        threadgroup_barrier(mem_flags::mem_threadgroup);
    }
    out[thread_position_in_grid.x] = buf[(t + 63) % 64];
    """,
)


def _shift(barrier, detect_races=True):
    x = mx.arange(128, dtype=mx.float32)
    return emulator.run_checked(
        SHIFT,
        inputs=[x],
        template=[("BARRIER", barrier)],
        grid=(128, 1, 1),
        threadgroup=(64, 1, 1),
        output_shapes=[(128,)],
        output_dtypes=[mx.float32],
        detect_races=detect_races,
    )


def test_missing_barrier_is_a_race_found_by_comparing_schedules():
    with pytest.raises(emulator.RaceError, match="differs between schedules"):
        _shift(barrier=False, detect_races=False)
    (out,) = _shift(barrier=True, detect_races=False)
    expected = np.roll(np.arange(128).reshape(2, 64), 1, axis=1).reshape(-1)
    np.testing.assert_array_equal(np.array(out), expected)


def test_missing_barrier_is_a_race_found_directly_with_its_lines():
    with pytest.raises(emulator.RaceError) as info:
        _shift(barrier=False)
    message = str(info.value)
    assert "threadgroup memory race on buf[" in message
    # Both accesses are quoted from the generated source.
    assert re.search(r"\|\s+buf\[t\] = x\[thread_position_in_grid.x\];", message)
    assert re.search(r"\|\s+out\[.*\] = buf\[\(t \+ 63\) % 64\];", message)
    (out,) = _shift(barrier=True)
    expected = np.roll(np.arange(128).reshape(2, 64), 1, axis=1).reshape(-1)
    np.testing.assert_array_equal(np.array(out), expected)


def test_threadgroup_memory_starts_poisoned():
    # Reverse order: every thread but the first reads a slot not yet written.
    x = mx.arange(64, dtype=mx.float32)
    (out,) = emulator.run(
        SHIFT, inputs=[x], template=[("BARRIER", False)], grid=(64, 1, 1),
        threadgroup=(64, 1, 1), output_shapes=[(64,)], output_dtypes=[mx.float32],
        schedule="reverse",
    )
    assert np.isnan(np.array(out)[1:]).all()
    assert np.array(out)[0] == 63


TG_MEMORY = kernel(
    "emu_tg_memory",
    ["x"],
    ["out"],
    """
    // A 16 KB block and a second one of N floats.
    threadgroup float a[4096];
    threadgroup float b[N];
    uint t = thread_index_in_threadgroup;
    a[t] = x[t];
    b[t] = 2.0f * x[t];
    threadgroup_barrier(mem_flags::mem_threadgroup);
    out[t] = a[31 - t] + b[t];
    """,
)


def test_threadgroup_memory_is_capped_at_32_kb_as_on_metal():
    x = mx.arange(32, dtype=mx.float32)
    call = dict(
        inputs=[x], grid=(32, 1, 1), threadgroup=(32, 1, 1),
        output_shapes=[(32,)], output_dtypes=[mx.float32],
    )
    # Exactly 32 KB fits.
    (out,) = emulator.run(TG_MEMORY, template=[("N", 4096)], **call)
    np.testing.assert_array_equal(np.array(out), np.arange(31, -1, -1) + 2 * np.arange(32))
    # One 16-byte granule more does not.
    too_much = r"32784 bytes .*exceeds 32768 bytes \(32 KB\)"
    with pytest.raises(emulator.EmulatorError, match=too_much):
        emulator.run(TG_MEMORY, template=[("N", 4100)], **call)


EARLY_RETURN = kernel(
    "emu_early_return",
    ["x"],
    ["out"],
    """
    threadgroup float buf[32];
    uint t = thread_index_in_threadgroup;
    if (t >= 30) {
        return;  // these threads never reach the barrier below
    }
    buf[t] = x[t];
    threadgroup_barrier(mem_flags::mem_threadgroup);
    out[t] = buf[31 - t];
    """,
)


def test_return_before_barrier_is_divergence():
    x = mx.arange(32, dtype=mx.float32)
    with pytest.raises(emulator.DivergenceError) as info:
        emulator.run(
            EARLY_RETURN, inputs=[x], grid=(32, 1, 1), threadgroup=(32, 1, 1),
            output_shapes=[(32,)], output_dtypes=[mx.float32],
        )
    message = str(info.value)
    assert "threads waiting at threadgroup_barrier (line 12): (0,0,0), (1,0,0)" in message
    assert "threads that returned without reaching it: (30,0,0), (31,0,0)" in message


DOUBLE = kernel(
    "emu_double",
    ["x"],
    ["out"],
    """
    uint i = thread_position_in_grid.x;
    double wide = x[i];
    out[i] = float(wide);
    """,
)


def test_double_is_a_compile_error_showing_the_line():
    with pytest.raises(emulator.CompileError) as info:
        emulator.run(
            DOUBLE, inputs=[mx.ones((4,))], grid=(4, 1, 1), threadgroup=(4, 1, 1),
            output_shapes=[(4,)], output_dtypes=[mx.float32],
        )
    message = str(info.value)
    assert "double_is_not_supported_in_metal" in message
    assert ">>" in message and "double wide = x[i];" in message


def _fragment_copy(tile_type, out_cast):
    # Loads an 8x8 float fragment from a threadgroup tile of `tile_type` and
    # stores it through `out_cast(out)`.
    return kernel(
        f"emu_fragment_{tile_type}_{'cast' if out_cast else 'plain'}",
        ["x"],
        ["out"],
        f"""
        threadgroup {tile_type} tile[64];
        uint t = thread_index_in_simdgroup;
        tile[t] = x[t];
        tile[t + 32] = x[t + 32];
        threadgroup_barrier(mem_flags::mem_threadgroup);
        simdgroup_matrix<float, 8, 8> m;
        simdgroup_load(m, tile, 8);
        simdgroup_store(m, {out_cast}(out), 8);
        """,
    )


@pytest.mark.parametrize(
    "tile_type, out_cast, wrong",
    [
        ("half", "", "simdgroup_load(m, tile, 8);"),  # float fragment from a half tile
        ("float", "(device half*)", "simdgroup_store(m, (device half*)(out), 8);"),
    ],
)
def test_simdgroup_load_store_take_the_fragments_element_type(tile_type, out_cast, wrong):
    # Metal's simdgroup_load / simdgroup_store take a pointer to the matrix's
    # element type; a mismatch fails to compile here as it does on Metal.
    x = mx.arange(64, dtype=mx.float32)
    call = dict(
        inputs=[x], grid=(32, 1, 1), threadgroup=(32, 1, 1),
        output_shapes=[(64,)], output_dtypes=[mx.float32],
    )
    (out,) = emulator.run(_fragment_copy("float", ""), **call)
    np.testing.assert_array_equal(np.array(out), np.arange(64))
    with pytest.raises(emulator.CompileError) as info:
        emulator.run(_fragment_copy(tile_type, out_cast), **call)
    assert re.search(r">>.*" + re.escape(wrong), str(info.value))


def test_schedules_are_deterministic_and_validated():
    x = mx.arange(64, dtype=mx.float32)
    call = dict(
        inputs=[x], template=[("BARRIER", False)], grid=(64, 1, 1),
        threadgroup=(64, 1, 1), output_shapes=[(64,)], output_dtypes=[mx.float32],
    )
    a = np.array(emulator.run(SHIFT, schedule=5, **call)[0])
    b = np.array(emulator.run(SHIFT, schedule=5, **call)[0])
    np.testing.assert_array_equal(a, b)
    fwd = np.array(emulator.run(SHIFT, schedule="forward", **call)[0])
    # Forward order: thread t reads slot t - 1 after it was written.
    np.testing.assert_array_equal(fwd[1:], np.arange(63))
    assert np.isnan(fwd[0])
    with pytest.raises(ValueError, match="schedule"):
        emulator.run(SHIFT, schedule="sideways", **call)
    with pytest.raises(ValueError, match="1024"):
        emulator.run(SHIFT, **{**call, "threadgroup": (2048, 1, 1)})


def test_metal_context_sets_the_active_schedule():
    assert not emulator.is_active()
    with emulator.metal(schedule=3):
        assert emulator.is_active()
        assert emulator.active_schedule() == 3
    assert not emulator.is_active()
    assert emulator.active_schedule() == "forward"


SIMD_EXCHANGE = kernel(
    "emu_simd_exchange",
    ["x"],
    ["out"],
    """
    // Lane 0 of each SIMD group publishes a value; the others read it.
    threadgroup float slot[2];
    uint sg = simdgroup_index_in_threadgroup;
    if (thread_index_in_simdgroup == 0) {
        slot[sg] = x[sg];
    }
    if (SYNC == 1) {
        simdgroup_barrier(mem_flags::mem_threadgroup);
    } else if (SYNC == 2) {
        threadgroup_barrier(mem_flags::mem_threadgroup);
    }
    out[thread_position_in_grid.x] = slot[READ_OTHER ? 1 - sg : sg];
    """,
)


@pytest.mark.parametrize(
    "sync, read_other, races",
    [
        (0, False, True),  # no barrier at all
        (1, False, False),  # simdgroup_barrier orders lanes of one SIMD group
        (1, True, True),  # ... but not two SIMD groups
        (2, True, False),  # threadgroup_barrier orders the whole group
    ],
)
def test_barrier_scopes_in_race_detection(sync, read_other, races):
    x = mx.array([3.0, 5.0])
    call = dict(
        inputs=[x], template=[("SYNC", sync), ("READ_OTHER", read_other)],
        grid=(64, 1, 1), threadgroup=(64, 1, 1),
        output_shapes=[(64,)], output_dtypes=[mx.float32],
    )
    if races:
        with pytest.raises(emulator.RaceError, match=r"race on slot\["):
            emulator.run_checked(SIMD_EXCHANGE, **call)
    else:
        (out,) = emulator.run_checked(SIMD_EXCHANGE, **call)
        own = np.repeat([3.0, 5.0], 32)
        np.testing.assert_array_equal(np.array(out), own[::-1] if read_other else own)


SCALAR_AND_HALF = kernel(
    "emu_scalar_and_half",
    ["x", "s"],
    ["out"],
    """
    // A 0-d input arrives as a reference to one value; half vectors and the
    // `h` literal suffix behave as in Metal.
    uint i = thread_position_in_grid.x;
    half2 h = half2(x[2 * i], x[2 * i + 1]) * 0.5h + half(s);
    h = metal::max(h, half2(numeric_limits<half>::lowest()));
    out[2 * i] = h.x;
    out[2 * i + 1] = h.y;
    """,
)


def test_scalar_input_and_half_vectors():
    x = mx.arange(8, dtype=mx.float16)
    (out,) = emulator.run(
        SCALAR_AND_HALF,
        inputs=[x, mx.array(1.25)],
        grid=(4, 1, 1),
        threadgroup=(4, 1, 1),
        output_shapes=[(8,)],
        output_dtypes=[mx.float16],
    )
    np.testing.assert_array_equal(
        np.array(out), np.arange(8, dtype=np.float16) * 0.5 + np.float16(1.25)
    )


def test_compiled_kernels_are_cached_on_disk(tmp_path, monkeypatch):
    monkeypatch.setenv("MLX_FLASH_EMULATOR_CACHE", str(tmp_path))
    call = dict(
        inputs=[mx.arange(8, dtype=mx.float16), mx.array(0.5)], grid=(4, 1, 1),
        threadgroup=(4, 1, 1), output_shapes=[(8,)], output_dtypes=[mx.float16],
    )
    emulator.run(SCALAR_AND_HALF, **call)
    libraries = list(tmp_path.glob("*.so"))
    assert len(libraries) == 1
    stamp = libraries[0].stat().st_mtime_ns
    emulator.run(SCALAR_AND_HALF, **call)
    assert list(tmp_path.glob("*.so")) == libraries
    assert libraries[0].stat().st_mtime_ns == stamp


def test_missing_compiler_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.delenv("CXX", raising=False)
    with pytest.raises(emulator.CompilerNotFoundError, match="C\\+\\+17 compiler"):
        emulator.run(
            PARTIAL_WRITE, inputs=[], grid=(8, 1, 1), threadgroup=(8, 1, 1),
            output_shapes=[(8,)], output_dtypes=[mx.float32],
        )


OUT_OF_BOUNDS = kernel(
    "emu_out_of_bounds",
    ["x"],
    ["out"],
    """
    uint i = thread_position_in_grid.x;
    out[i] = x[i + (i == 3 ? 4000000000u : 0u)];
    """,
)


def test_invalid_memory_access_is_an_error_not_a_crash():
    call = dict(
        inputs=[mx.arange(8, dtype=mx.float32)], grid=(8, 1, 1),
        threadgroup=(8, 1, 1), output_shapes=[(8,)], output_dtypes=[mx.float32],
    )
    with pytest.raises(emulator.EmulatorError, match=r"invalid memory access .* thread \(3,0,0\)"):
        emulator.run(OUT_OF_BOUNDS, **call)
    # The process and the emulator carry on.
    (out,) = emulator.run(PARTIAL_WRITE, init_value=0, **{**call, "inputs": []})
    np.testing.assert_array_equal(np.array(out), [1, 0] * 4)


DIVERGENT_COLLECTIVES = kernel(
    "emu_divergent_collectives",
    ["x"],
    ["out"],
    """
    // In divergent code a collective runs over the lanes that reach it.
    uint lane = thread_index_in_simdgroup;
    float v = x[thread_position_in_grid.x];
    float r;
    if (lane < 12) {
        r = simd_sum(v);
    } else {
        r = simd_max(v);
    }
    threadgroup_barrier(mem_flags::mem_none);
    out[thread_position_in_grid.x] = r;
    """,
)


def test_collectives_in_divergent_branches_use_the_active_lanes():
    v = np.random.default_rng(5).integers(-50, 50, 64).astype(np.float32)
    (out,) = emulator.run_checked(
        DIVERGENT_COLLECTIVES, inputs=[mx.array(v)], grid=(64, 1, 1),
        threadgroup=(64, 1, 1), output_shapes=[(64,)], output_dtypes=[mx.float32],
    )
    v = v.reshape(2, 32)
    expected = np.concatenate(
        [np.repeat(v[:, :12].sum(1, keepdims=True), 12, 1),
         np.repeat(v[:, 12:].max(1, keepdims=True), 20, 1)], axis=1)
    np.testing.assert_array_equal(np.array(out).reshape(2, 32), expected)


TG_HISTOGRAM = kernel(
    "emu_tg_histogram",
    ["x"],
    ["out"],
    """
    // Threadgroup atomics need no barrier between the threads that add.
    threadgroup atomic_int bins[4];
    uint t = thread_index_in_threadgroup;
    if (t < 4) {
        atomic_store_explicit(&bins[t], 0, memory_order_relaxed);
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    atomic_fetch_add_explicit(&bins[x[thread_position_in_grid.x]], 1, memory_order_relaxed);
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (t < 4) {
        out[threadgroup_position_in_grid.x * 4 + t] =
            atomic_load_explicit(&bins[t], memory_order_relaxed);
    }
    """,
)


def test_threadgroup_atomics_are_not_races():
    x = np.random.default_rng(6).integers(0, 4, 96).astype(np.int32)
    (out,) = emulator.run_checked(
        TG_HISTOGRAM, inputs=[mx.array(x)], grid=(96, 1, 1),
        threadgroup=(48, 1, 1), output_shapes=[(2, 4)], output_dtypes=[mx.int32],
    )
    expected = [np.bincount(x[:48], minlength=4), np.bincount(x[48:], minlength=4)]
    np.testing.assert_array_equal(np.array(out), expected)


BUILTINS = kernel(
    "emu_builtins",
    ["x"],
    ["out"],
    """
    uint i = thread_position_in_grid.x;
    float4 a = 0;
    a += float4(x[i], -x[i], 2.0f * x[i], 0.5f);
    float4 e = metal::exp(a) - 1.0f;
    float4 c = clamp(a, -1.0f, 1.0f);
    float4 s = select(c, e, a > 0.5f);
    bfloat16_t b = bfloat16_t(a.x);
    half h = static_cast<half>(a.z);
    float r = metal::precise::divide(1.0f, 3.0f) + metal::fast::divide(float(b), 2.0f);
    int k = int(float(h)) >> 1;
    float limit = float(metal::numeric_limits<bfloat16_t>::infinity());
    ushort bits = as_type<ushort>(half(1.0f));
    out[8 * i + 0] = s.x;
    out[8 * i + 1] = s.y;
    out[8 * i + 2] = s.z;
    out[8 * i + 3] = fma(s.w, 2.0f, 1.0f);
    out[8 * i + 4] = r;
    out[8 * i + 5] = float(k) + float(metal::min(k, 1u));
    out[8 * i + 6] = isinf(limit) ? 1.0f : 0.0f;
    out[8 * i + 7] = float(bits) + simd_sum(float2(1.0f, 2.0f)).y;
    """,
    header="METAL_FUNC float unused_helper(float v) { return v; }\n",
)


def test_metal_builtins():
    xs = np.array([-2.0, 0.25, 0.75, 3.0], dtype=np.float32)
    (out,) = emulator.run(
        BUILTINS, inputs=[mx.array(xs)], grid=(4, 1, 1), threadgroup=(4, 1, 1),
        output_shapes=[(4, 8)], output_dtypes=[mx.float32],
    )
    out = np.array(out)
    a = np.stack([xs, -xs, 2 * xs, np.full(4, 0.5)], axis=1).astype(np.float64)
    s = np.where(a > 0.5, np.exp(a) - 1, np.clip(a, -1, 1))
    np.testing.assert_allclose(out[:, :3], s[:, :3], rtol=1e-6)
    np.testing.assert_allclose(out[:, 3], s[:, 3] * 2 + 1, rtol=1e-6)
    bf = np.array(mx.array(xs).astype(mx.bfloat16).astype(mx.float32))
    np.testing.assert_allclose(out[:, 4], 1 / 3 + bf / 2, rtol=1e-6)
    k = np.trunc(2 * xs).astype(np.int32) >> 1
    # min(int, uint) compares as int here, as the first argument's type.
    np.testing.assert_array_equal(out[:, 5], k + np.minimum(k, 1))
    np.testing.assert_array_equal(out[:, 6], 1)
    np.testing.assert_array_equal(out[:, 7], 0x3C00 + 2 * 4)



# ------------------------------------------- what MLX does around a kernel --

FLAT_COPY_SOURCE = """
    // Reads x as if row-contiguous: element i of the flattened array is x[i].
    uint i = thread_position_in_grid.x;
    out[i] = x[i];
    if (i < 2) {
        strides[i] = float(x_strides[i]);
    }
"""


@pytest.mark.parametrize("make", ["transpose", "split"])
def test_inputs_are_copied_row_contiguous_when_the_kernel_asks(make):
    # MLX copies an input that is not row-contiguous before a kernel built
    # with ensure_row_contiguous=True (the default) and passes the copy's
    # strides; with False the kernel reads the input's own memory.
    base = mx.arange(24, dtype=mx.float32).reshape(4, 6)
    if make == "transpose":
        x, start, own_strides = base.T, 0, [1, 6]  # (6, 4)
    else:
        x, start, own_strides = mx.split(base, 2, axis=1)[1], 3, [6, 1]  # (4, 3)
    call = dict(
        inputs=[x], grid=(x.size, 1, 1), threadgroup=(x.size, 1, 1),
        output_shapes=[(x.size,), (2,)], output_dtypes=[mx.float32, mx.float32],
    )
    copying = mx.fast.metal_kernel(
        name="emu_flat_copy", input_names=["x"], output_names=["out", "strides"],
        source=FLAT_COPY_SOURCE,
    )
    out, strides = emulator.run(copying, **call)
    np.testing.assert_array_equal(np.array(out), np.array(x).reshape(-1))
    np.testing.assert_array_equal(np.array(strides), [x.shape[1], 1])

    as_is = mx.fast.metal_kernel(
        name="emu_flat_copy_as_is", input_names=["x"], output_names=["out", "strides"],
        source=FLAT_COPY_SOURCE, ensure_row_contiguous=False,
    )
    out, strides = emulator.run(as_is, **call)
    memory = np.array(base).reshape(-1)
    np.testing.assert_array_equal(np.array(out), memory[start : start + x.size])
    np.testing.assert_array_equal(np.array(strides), own_strides)


FAST_MATH_BRANCH = """
    uint i = thread_position_in_grid.x;
    #if defined(__FAST_MATH__) && __FAST_MATH__
    out[i] = 1.0f;
    #else
    out[i] = 0.0f;
    #endif
"""


@pytest.mark.parametrize(
    "mode, defined", [(None, False), ("safe", False), ("relaxed", False), ("fast", True)]
)
def test_fast_math_macro_follows_the_kernels_math_mode(mode, defined):
    # Metal defines __FAST_MATH__ only when MLX builds the library in fast
    # mode; MLX's default is safe.
    options = {"compile_options": {"math_mode": mode}} if mode else {}
    k = mx.fast.metal_kernel(
        name="emu_fast_math_branch", input_names=["x"], output_names=["out"],
        source=FAST_MATH_BRANCH, **options,
    )
    (out,) = emulator.run(
        k, inputs=[mx.zeros((4,))], grid=(4, 1, 1), threadgroup=(4, 1, 1),
        output_shapes=[(4,)], output_dtypes=[mx.float32],
    )
    np.testing.assert_array_equal(np.array(out), [float(defined)] * 4)


def test_init_value_is_converted_to_the_output_dtype_as_mlx_does():
    (out,) = emulator.run(
        PARTIAL_WRITE, inputs=[], grid=(8, 1, 1), threadgroup=(8, 1, 1),
        output_shapes=[(8,)], output_dtypes=[mx.int32], init_value=-3.75,
    )
    np.testing.assert_array_equal(np.array(out), [1, -3] * 4)


# ----------------------------------------------------------------- fast math --


def _math_probe(function, xs, math):
    """``function`` through metal::, metal::fast::, metal::precise:: and on
    half, for float inputs ``xs``, under ``math``."""
    body = """
    uint i = thread_position_in_grid.x;
    float v = x[i];
    plain[i] = F(v);
    fast[i] = metal::fast::F(v);
    precise[i] = metal::precise::F(v);
    half_out[i] = F(half(v));
    """.replace("F(", f"{function}(")
    k = mx.fast.metal_kernel(
        name=f"emu_math_{function}", input_names=["x"],
        output_names=["plain", "fast", "precise", "half_out"], source=body,
    )
    x = mx.array(np.asarray(xs, dtype=np.float32))
    outs = emulator.run(
        k, inputs=[x], grid=(x.size, 1, 1), threadgroup=(min(x.size, 256), 1, 1),
        output_shapes=[x.shape] * 4, output_dtypes=[mx.float32] * 3 + [mx.float16], math=math,
    )
    return [np.array(o) for o in outs]


def _ulps(a, b):
    return np.abs(a.view(np.int32).astype(np.int64) - b.view(np.int32).astype(np.int64))


@pytest.mark.parametrize("function", ["exp", "exp2"])
def test_fast_math_moves_exp_within_metals_bound(function):
    # MSL specification, table 8.2 (fast math): exp and exp2 are within
    # 3 + floor(fabs(2 * x)) ulp; macOS 15 uses the fast variants for the
    # unqualified functions too, precise:: keeps its own accuracy.
    finite = np.linspace(-20, 20, 81)
    special = [-np.inf, np.inf, np.nan]
    xs = np.concatenate([finite, special]).astype(np.float32)
    reference = (np.exp(finite) if function == "exp" else np.exp2(finite)).astype(np.float32)

    plain, fast, precise, halves = _math_probe(function, xs, "precise")
    for out in (plain, fast, precise):
        assert _ulps(out[:81], reference).max() <= 1
    plain_f, fast_f, precise_f, halves_f = _math_probe(function, xs, "fast")
    bound = 3 + np.floor(np.abs(2 * xs[:81].astype(np.float64)))
    for out in (plain_f, fast_f):
        moved = _ulps(out[:81], precise[:81])
        assert (moved <= bound).all()
        assert (moved > 0).mean() > 0.9
        np.testing.assert_array_equal(out[81:83], [0.0, np.inf])
        assert np.isnan(out[83])
    np.testing.assert_array_equal(precise_f, precise)
    np.testing.assert_array_equal(halves_f, halves)  # half has no fast variant


def test_fast_math_log_keeps_metals_absolute_bound_near_one():
    # Table 8.2: log's absolute error is at most 2^-21 on [0.5, 2], and at
    # most 3 ulp for other x > 0.
    xs = np.concatenate([np.linspace(0.5, 2.0, 31), np.linspace(3, 1000, 31)]).astype(np.float32)
    plain, _, precise, _ = _math_probe("log", xs, "fast")
    near_one = xs <= 2.0
    error = np.abs(plain.astype(np.float64) - precise.astype(np.float64))
    assert error[near_one].max() <= 2.0 ** -21
    assert error[near_one].max() > 0
    assert _ulps(plain[~near_one], precise[~near_one]).max() <= 3


POWERS_OF_TWO_SOURCE = """
    // Relies on exp2 of an integer being exactly a power of two: true of the
    // CPU library, not promised by Metal's fast exp2.
    uint i = thread_position_in_grid.x;
    exact[i] = exp2(float(i)) == float(1u << i) ? 1.0f : 0.0f;
    precise_exact[i] = precise::exp2(float(i)) == float(1u << i) ? 1.0f : 0.0f;
"""
POWERS_OF_TWO = kernel("emu_powers_of_two", [], ["exact", "precise_exact"], POWERS_OF_TWO_SOURCE)


def test_kernel_relying_on_exact_math_fails_under_fast_math():
    call = dict(
        inputs=[], grid=(16, 1, 1), threadgroup=(16, 1, 1),
        output_shapes=[(16,)] * 2, output_dtypes=[mx.float32] * 2,
    )
    exact, precise_exact = emulator.run(POWERS_OF_TWO, **call)
    assert np.array(exact).all() and np.array(precise_exact).all()
    exact, precise_exact = emulator.run(POWERS_OF_TWO, math="fast", **call)
    assert not np.array(exact).any()
    assert np.array(precise_exact).all()
    # A kernel MLX builds in fast math mode gets the fast functions unasked.
    built_fast = mx.fast.metal_kernel(
        name="emu_powers_of_two_fast", input_names=[], output_names=["exact", "precise_exact"],
        source=POWERS_OF_TWO_SOURCE, compile_options={"math_mode": "fast"},
    )
    exact, _ = emulator.run(built_fast, **call)
    assert not np.array(exact).any()
    exact, _ = emulator.run(built_fast, math="precise", **call)
    assert np.array(exact).all()
    with pytest.raises(ValueError, match="math must be one of"):
        emulator.run(POWERS_OF_TWO, math="approximate", **call)


# ----------------------------------------------------- barriers and races --

BARRIER_FLAGS_SOURCE = """
    threadgroup float buf[64];
    uint t = thread_index_in_threadgroup;
    buf[t] = x[t];
    threadgroup_barrier(mem_flags::FLAGS);
    out[t] = buf[63 - t];
"""


@pytest.mark.parametrize(
    "flags, races",
    [
        ("mem_none", True),  # orders execution only
        ("mem_device", True),  # orders device memory, not threadgroup memory
        ("mem_threadgroup", False),
        ("mem_device | mem_flags::mem_threadgroup", False),
    ],
)
def test_only_a_threadgroup_memory_barrier_orders_threadgroup_memory(flags, races):
    # MSL specification, threadgroup_barrier: mem_none makes the threads
    # wait for each other but does not make a write visible to the others.
    name = "emu_barrier_" + re.sub(r"\W+", "_", flags)
    k = kernel(name, ["x"], ["out"], BARRIER_FLAGS_SOURCE.replace("FLAGS", flags))
    call = dict(
        inputs=[mx.arange(64, dtype=mx.float32)], grid=(64, 1, 1), threadgroup=(64, 1, 1),
        output_shapes=[(64,)], output_dtypes=[mx.float32],
    )
    if races:
        with pytest.raises(emulator.RaceError) as info:
            emulator.run_checked(k, **call)
        assert "race on buf[" in str(info.value)
        assert "buf[t] = x[t];" in str(info.value)
        assert "out[t] = buf[63 - t];" in str(info.value)
    else:
        (out,) = emulator.run_checked(k, **call)
        np.testing.assert_array_equal(np.array(out), np.arange(63, -1, -1))


THROUGH_HELPERS = kernel(
    "emu_through_helpers",
    ["x"],
    ["out"],
    """
    threadgroup float buf[64];
    threadgroup float* mine = buf + thread_index_in_threadgroup;
    put(mine, x[thread_position_in_grid.x]);
    if (BARRIER) {
        threadgroup_barrier(mem_flags::mem_threadgroup);
    }
    out[thread_position_in_grid.x] = neighbour(buf, thread_index_in_threadgroup);
    """,
    header="""
inline void put(threadgroup float* slot, float v) {
  *slot = v;
}
inline float neighbour(const threadgroup float* row, uint t) {
  const threadgroup float& left = row[(t + 63) % 64];
  return left;
}
""",
)


def test_race_through_helper_pointers_and_references_is_found_by_address():
    call = dict(
        inputs=[mx.arange(64, dtype=mx.float32)], grid=(64, 1, 1), threadgroup=(64, 1, 1),
        output_shapes=[(64,)], output_dtypes=[mx.float32],
    )
    with pytest.raises(emulator.RaceError) as info:
        emulator.run_checked(THROUGH_HELPERS, template=[("BARRIER", False)], **call)
    message = str(info.value)
    assert "race on buf[" in message
    # The accesses are inside the helpers; the kernel lines that call them
    # are quoted too.
    assert re.search(r"\|\s+\*slot = v;", message)
    assert re.search(r"\|\s+return left;", message)
    assert re.search(r"\|\s+put\(mine, x\[thread_position_in_grid.x\]\);", message)
    assert re.search(r"\|\s+out\[.*\] = neighbour\(buf, thread_index_in_threadgroup\);", message)
    (out,) = emulator.run_checked(THROUGH_HELPERS, template=[("BARRIER", True)], **call)
    np.testing.assert_array_equal(np.array(out), np.roll(np.arange(64), 1))


ACROSS_SIMD_GROUPS = kernel(
    "emu_across_simd_groups",
    ["x"],
    ["out"],
    """
    // A simdgroup_barrier orders the lanes of one SIMD group only; reading
    // the other group's slot needs a threadgroup_barrier.
    threadgroup float buf[64];
    uint t = thread_index_in_threadgroup;
    buf[t] = x[t];
    simdgroup_barrier(mem_flags::mem_threadgroup);
    out[t] = buf[(t + 32) % 64];
    """,
)


def test_race_between_simd_groups_changes_results_when_one_runs_ahead():
    call = dict(
        inputs=[mx.arange(64, dtype=mx.float32)], grid=(64, 1, 1), threadgroup=(64, 1, 1),
        output_shapes=[(64,)], output_dtypes=[mx.float32], detect_races=False,
    )
    # Lockstep schedules write every slot before any thread reads: blind.
    (out,) = emulator.run_checked(ACROSS_SIMD_GROUPS, schedules=("forward", "reverse"), **call)
    np.testing.assert_array_equal(np.array(out), np.roll(np.arange(64), 32))
    for ahead in ("ahead", "ahead-reverse"):
        with pytest.raises(emulator.RaceError, match=f"'forward' and '{ahead}'"):
            emulator.run_checked(ACROSS_SIMD_GROUPS, schedules=("forward", ahead), **call)
    # The group that runs first reads the other's slots before they are written.
    (ahead,) = emulator.run(ACROSS_SIMD_GROUPS, schedule="ahead", **call)
    assert np.isnan(np.array(ahead)[:32]).all()
    np.testing.assert_array_equal(np.array(ahead)[32:], np.arange(32))
    with pytest.raises(emulator.RaceError, match=r"race on buf\["):
        emulator.run_checked(ACROSS_SIMD_GROUPS, **{**call, "detect_races": True})


FLOAT_SUMS = mx.fast.metal_kernel(
    name="emu_float_sums",
    input_names=["x"],
    output_names=["sums", "counts"],
    source="""
    uint i = thread_position_in_grid.x;
    atomic_fetch_add_explicit(&sums[i % 4], x[i], memory_order_relaxed);
    atomic_fetch_add_explicit(&counts[i % 4], 1.0f, memory_order_relaxed);
    """,
    atomic_outputs=True,
)

LAST_WRITER = mx.fast.metal_kernel(
    name="emu_last_writer",
    input_names=["x"],
    output_names=["out"],
    source="""
    uint i = thread_position_in_grid.x;
    atomic_store_explicit(&out[0], x[i], memory_order_relaxed);
    """,
    atomic_outputs=True,
)


def test_float_atomic_sums_are_order_dependent_not_races():
    # The order of atomic float additions changes their rounding; the
    # results agree within the bound that rounding allows.
    xs = np.random.default_rng(7).standard_normal(512).astype(np.float32) * 100
    call = dict(
        inputs=[mx.array(xs)], grid=(512, 1, 1), threadgroup=(64, 1, 1),
        output_shapes=[(4,), (4,)], output_dtypes=[mx.float32, mx.float32], init_value=0,
    )
    with pytest.warns(emulator.OrderDependentWarning, match="output 0 depends on the order"):
        sums, counts = emulator.run_checked(FLOAT_SUMS, **call)
    expected = xs.astype(np.float64).reshape(-1, 4).sum(axis=0)
    np.testing.assert_allclose(np.array(sums), expected, rtol=1e-5)
    np.testing.assert_array_equal(np.array(counts), [128] * 4)  # exact in any order
    # Which thread's store lands last is a race, atomic or not.
    with pytest.raises(emulator.RaceError, match="beyond the rounding of its float atomic"):
        emulator.run_checked(LAST_WRITER, **{**call, "output_shapes": [(1,)], "output_dtypes": [mx.float32]})


# -------------------------------------------------------------- strict pass --

STRICT_CALL = dict(
    grid=(64, 1, 1), threadgroup=(64, 1, 1), output_shapes=[(64,)], output_dtypes=[mx.float32],
)

# (name, header, body, the source line the strict pass must quote): each
# breaks a rule of the Metal Shading Language that Apple's compiler enforces
# and the CPU build does not.
REJECTED = [
    (
        "device_to_thread",  # pointers keep their address space
        "",
        "uint i = thread_position_in_grid.x;\nthread const float* p = x;\nout[i] = p[i];",
        "thread const float* p = x;",
    ),
    (
        "helper_without_threadgroup",  # a helper's pointer parameter is thread memory
        "inline float first(float* p) { return p[0]; }\n",
        "threadgroup float buf[64];\nuint i = thread_index_in_threadgroup;\nbuf[i] = x[i];\n"
        "threadgroup_barrier(mem_flags::mem_threadgroup);\nout[i] = first(buf);",
        "out[i] = first(buf);",
    ),
    (
        "constant_to_device",  # MLX passes inputs of < 8 elements in constant memory
        "inline float get(const device float* p, uint i) { return p[i]; }\n",
        "uint i = thread_position_in_grid.x;\nout[i] = get(x, i);",
        "out[i] = get(x, i);",
    ),
    (
        "simdgroup_load_from_thread",  # simdgroup_load reads device or threadgroup memory
        "",
        "float local[64];\nfor (int j = 0; j < 64; ++j) { local[j] = x[j]; }\n"
        "simdgroup_matrix<float, 8, 8> m;\nsimdgroup_load(m, local, 8);\nsimdgroup_store(m, out, 8);",
        "simdgroup_load(m, local, 8);",
    ),
    (
        "mixed_max",  # max(half, float): two overloads match equally
        "",
        "uint i = thread_position_in_grid.x;\nhalf h = half(x[i]);\nout[i] = max(h, x[i]);",
        "out[i] = max(h, x[i]);",
    ),
    (
        "variable_length_array",
        "",
        "uint i = thread_position_in_grid.x;\nint n = int(x[0]) + 1;\nfloat t[n];\nt[0] = x[i];\nout[i] = t[0];",
        "float t[n];",
    ),
    (
        "mutable_global",  # program-scope variables live in constant memory
        "float scale_factor = 2.0f;\n",
        "uint i = thread_position_in_grid.x;\nout[i] = x[i] * scale_factor;",
        "float scale_factor = 2.0f;",
    ),
    (
        "std_namespace",
        "",
        "uint i = thread_position_in_grid.x;\nout[i] = std::max(x[i], 0.0f);",
        "out[i] = std::max(x[i], 0.0f);",
    ),
    (
        "double",
        "",
        "uint i = thread_position_in_grid.x;\ndouble wide = x[i];\nout[i] = float(wide);",
        "double wide = x[i];",
    ),
    (
        "barrier_without_flags",  # threadgroup_barrier takes its mem_flags
        "",
        "uint i = thread_position_in_grid.x;\nthreadgroup_barrier();\nout[i] = x[i];",
        "threadgroup_barrier();",
    ),
]


@pytest.mark.parametrize("name, header, body, line", REJECTED, ids=[r[0] for r in REJECTED])
def test_strict_pass_rejects_what_metal_rejects(name, header, body, line):
    k = kernel(f"emu_strict_{name}", ["x"], ["out"], body, header=header)
    with pytest.raises(emulator.StrictError) as info:
        emulator.strict_check(k, inputs=[mx.arange(64, dtype=mx.float32)], **STRICT_CALL)
    assert re.search(r">>\s+\d+ \| " + re.escape(line), str(info.value)), str(info.value)


STRICT_OK = kernel(
    "emu_strict_ok",
    ["x", "params"],
    ["out"],
    """
    threadgroup float4 tile[16];
    threadgroup half weights[8];
    uint i = thread_index_in_threadgroup;
    if (i < 16) {
        tile[i] = float4(x[i], x[i] * 2.0f, lookup(params, i), 1.0f);
    }
    if (i < 8) {
        weights[i] = half(i);
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    float4 v = tile[i % 16];
    out[i] = dot(v.xy, float2(1.0f)) + metal::max(v.z, SCALE) + float(weights[i % 8]);
    """,
    header="""
constant constexpr float SCALE = 0.5f;
template <typename Ptr>
inline float lookup(Ptr values, uint i) {
  return float(values[i % 4]);
}
""",
)


def test_strict_pass_accepts_valid_metal_and_reports_threadgroup_memory():
    # params has 4 elements, so MLX passes it in constant memory; the
    # template helper compiles for either address space.
    report = emulator.strict_check(
        STRICT_OK, inputs=[mx.arange(64, dtype=mx.float32), mx.ones((4,))], **STRICT_CALL
    )
    assert report.threadgroup_bytes == {"tile": 16 * 16, "weights": 8 * 2}
    assert report.total_threadgroup_bytes == 272
    assert report.sources == 3  # as called, all inputs constant, all device
    assert "272 bytes" in str(report)


def test_metal_context_runs_the_strict_pass_on_every_kernel():
    bad = kernel("emu_strict_in_context", ["x"], ["out"], REJECTED[4][2])
    call = dict(inputs=[mx.arange(64, dtype=mx.float32)], **STRICT_CALL)
    (out,) = emulator.run(bad, **call)  # the CPU build takes it
    with emulator.metal(schedule="forward", strict=True):
        with pytest.raises(emulator.StrictError, match="ambiguous"):
            emulator.run(bad, **call)
    with emulator.metal(schedule="forward", strict=True) as session:
        (out,) = emulator.run(STRICT_OK, **{**call, "inputs": [call["inputs"][0], mx.ones((4,))]})
    assert [r.kernel for r in session.strict_reports] == ["custom_kernel_emu_strict_ok_float_floatc_float"]
    i = np.arange(64)
    np.testing.assert_array_equal(np.array(out), 3 * (i % 16) + 1 + i % 8)


# ------------------------------------------------------------------ profile --

REDUCE_EXP = kernel(
    "emu_reduce_exp",
    ["x"],
    ["out"],
    """
    // Per threadgroup of 64: 64 loads of x, 64 exp, one simd_sum per SIMD
    // group, 2 threadgroup stores and loads, one barrier, one store of out.
    threadgroup float partial[2];
    float s = simd_sum(exp(x[thread_position_in_grid.x]));
    if (thread_index_in_simdgroup == 0) {
        partial[simdgroup_index_in_threadgroup] = s;
    }
    threadgroup_barrier(mem_flags::mem_threadgroup);
    if (thread_index_in_threadgroup == 0) {
        out[threadgroup_position_in_grid.x] = partial[0] + partial[1];
    }
    """,
)


def test_profile_counts_bytes_collectives_barriers_and_math():
    x = mx.arange(256, dtype=mx.float32) / 256
    (out,), profile = emulator.run(
        REDUCE_EXP, inputs=[x], grid=(256, 1, 1), threadgroup=(64, 1, 1),
        output_shapes=[(4,)], output_dtypes=[mx.float32], profile=True,
    )
    np.testing.assert_allclose(
        np.array(out), np.exp(np.array(x, dtype=np.float64)).reshape(4, 64).sum(1), rtol=1e-6
    )
    assert profile.threadgroups == 4
    assert profile.device_bytes == {"x": (256 * 4, 0), "out": (0, 4 * 4)}
    assert profile["threadgroup.loaded_bytes"] == profile["threadgroup.stored_bytes"] == 4 * 2 * 4
    assert profile["threadgroup.peak_bytes"] == 8
    assert profile["barrier.threadgroup"] == 4
    assert profile.collectives == {"simd_sum": 4 * 2}
    assert profile.math == {"exp": 256}
    assert profile.summary()["device.x.loaded_bytes"] == (256, 256.0, 256)


def test_profile_counts_simdgroup_matrix_operations_and_shuffles():
    rng = np.random.default_rng(3)
    a, b = (mx.array(rng.standard_normal((8, 8)).astype(np.float16)) for _ in range(2))
    c = mx.array(rng.standard_normal((8, 8)).astype(np.float32))
    _, profile = emulator.run(
        MMA, inputs=[a, b, c], template=[("T", mx.float16), ("TRANSPOSE_B", False)],
        grid=(32, 1, 1), threadgroup=(32, 1, 1), output_shapes=[(8, 8), (64,)],
        output_dtypes=[mx.float32, mx.float32], profile=True,
    )
    # One SIMD group: three fragments loaded, one product, one stored; each
    # lane loads 2 elements of a, b and c and stores 2 of out and of elems.
    assert profile["simdgroup_matrix.load"] == 3
    assert profile["simdgroup_matrix.multiply_accumulate"] == 1
    assert profile["simdgroup_matrix.store"] == 1
    assert profile.device_bytes == {
        "a": (64 * 2, 0), "b": (64 * 2, 0), "c": (64 * 4, 0), "out": (0, 64 * 4), "elems": (0, 64 * 4),
    }
    outs, profile = emulator.run(
        SHUFFLES, inputs=[mx.arange(64, dtype=mx.float32)], grid=(64, 1, 1),
        threadgroup=(64, 1, 1), output_shapes=[(64,)] * 4, output_dtypes=[mx.float32] * 4,
        profile=True,
    )
    # Two SIMD groups, each: five shuffle_xor steps, then one of each other.
    assert profile.collectives == {
        "simd_shuffle_xor": 10, "simd_shuffle_down": 2, "simd_prefix_exclusive_sum": 2,
        "simd_broadcast": 2, "simd_max": 2,
    }


VECTOR_EXP = kernel(
    "emu_vector_exp",
    ["x"],
    ["out"],
    """
    // The grid of 100 ends in a threadgroup of 36. x[i] is read twice in
    // the source and loaded once: the profile counts the loads made.
    uint i = thread_position_in_grid.x;
    float4 v = float4(x[i]);
    out[i] = dot(exp2(v), float4(1.0f)) + log(x[i] + 1.0f);
    """,
)


def test_profile_summarises_threadgroups_and_counts_vector_components():
    x = mx.arange(100, dtype=mx.float32)
    _, profile = emulator.run(
        VECTOR_EXP, inputs=[x], grid=(100, 1, 1), threadgroup=(64, 1, 1),
        output_shapes=[(100,)], output_dtypes=[mx.float32], profile=True,
    )
    assert profile.math == {"exp2": 4 * 100, "log": 100}
    low, mean, high = profile.summary()["device.x.loaded_bytes"]
    assert (low, mean, high) == (36 * 4, 50 * 4, 64 * 4)
    assert "device.x.loaded_bytes" in str(profile)


def test_profile_counts_atomics_and_is_collected_by_metal_sessions():
    x = mx.array(np.random.default_rng(4).integers(0, 5, 100).astype(np.int32))
    call = dict(
        inputs=[x], grid=(100, 1, 1), threadgroup=(32, 1, 1),
        output_shapes=[(5,), (5,)], output_dtypes=[mx.int32, mx.float32], init_value=0,
    )
    with emulator.metal(schedule=("forward", "reverse"), profile=True) as session:
        counts, sums = emulator.run(HISTOGRAM, **call)  # as kernels.launch calls it
        (_, _), profile = emulator.run(HISTOGRAM, profile=True, **call)
    assert len(session.profiles) == 2 and session.profiles[1] is profile
    assert session.profiles[0].totals == profile.totals
    assert profile.kernel == "custom_kernel_emu_histogram_int32_t_int32_t_float"
    assert profile["atomic.device"] == 200
    np.testing.assert_array_equal(np.array(counts), np.bincount(np.array(x), minlength=5))
    assert session.profiles[0].threadgroups == 4


def test_a_subset_of_threadgroups_runs_and_is_counted_alone():
    x = mx.arange(512, dtype=mx.float32) / 512
    call = dict(
        inputs=[x], grid=(512, 1, 1), threadgroup=(64, 1, 1),
        output_shapes=[(8,)], output_dtypes=[mx.float32],
    )
    (full,), whole = emulator.run(REDUCE_EXP, profile=True, **call)
    (part,), profile = emulator.run(REDUCE_EXP, profile=True, threadgroups=[(5, 0, 0), (2,)], **call)
    # Rows in linear order; the threadgroups not run write nothing (NaN fill).
    assert profile.positions == [(2, 0, 0), (5, 0, 0)]
    assert profile.threadgroups == 2 and profile.group_counts == (8, 1, 1)
    np.testing.assert_array_equal(profile.per_threadgroup, whole.per_threadgroup[[2, 5]])
    assert profile["math.exp"] == 2 * 64 and profile.device_bytes["x"] == (2 * 64 * 4, 0)
    ran = np.array([2, 5])
    np.testing.assert_array_equal(np.array(part)[ran], np.array(full)[ran])
    assert np.isnan(np.delete(np.array(part), ran)).all()
    # Positions on a 3-D grid; a session's selection is a function of each
    # launch's threadgroup counts.
    call.update(grid=(128, 2, 2), output_shapes=[(2,)])
    with emulator.metal(schedule=("forward", "reverse"), profile=True,
                        threadgroups=lambda counts: [(1, y, 1) for y in range(counts[1])]) as session:
        emulator.run(REDUCE_EXP, **call)
    assert session.profiles[0].positions == [(1, 0, 1), (1, 1, 1)]
    assert session.profiles[0]["barrier.threadgroup"] == 2
    with pytest.raises(ValueError, match="outside"):
        emulator.run(REDUCE_EXP, threadgroups=[(2, 0, 0)], **call)
    with pytest.raises(ValueError, match="no threadgroup"):
        emulator.run(REDUCE_EXP, threadgroups=[], **call)


# --------------------------------------------------- the project's kernels --


def _inputs_and_mask(dtype, dim, value_dim, mask_kind):
    q, k, v, dout = kernel_checks.random_inputs(1, 2, 1, 9, 13, dim, value_dim, dtype, seed=dim)
    sinks = None
    if mask_kind == "structured":
        # Causal, a window, packed documents with padding, and sinks at once.
        ids = kernel_checks.segment_layout("padding", 1, 13, seed=dim)
        mask = kernel_checks.structured(9, 13, "causal", ids, 5)
        sinks = mx.random.normal((2,), key=mx.random.key(dim)).astype(dtype)
    else:
        mask = kernel_checks.random_mask(mask_kind, 2, 9, 13, dtype, seed=dim)
    return q, k, v, dout, mask, sinks


# (family, dtype, D, Dv, mask): every dtype and head dim of the demo family;
# every dtype twice and every head dim of the README's (32 to 256, one to
# eight elements per lane, Dv != D) once for the practical one; each family
# once with every structured part at once. These are template
# instantiations the kernel tests build too.
PROJECT_CASES = [
    (PRACTICAL, mx.float32, 96, 64, "additive"),
    (PRACTICAL, mx.float32, 128, 128, "bool_empty_row"),
    (PRACTICAL, mx.float16, 64, 64, "bool"),
    (PRACTICAL, mx.float16, 256, 256, "causal"),
    (PRACTICAL, mx.bfloat16, 32, 48, "bool_empty_row"),
    (PRACTICAL, mx.bfloat16, 80, 80, "structured"),
    (DEMO, mx.float16, 64, 64, "none"),
    (DEMO, mx.float16, 80, 80, "additive_nan_row"),
    (DEMO, mx.float16, 96, 96, "bool"),
    (DEMO, mx.float16, 128, 128, "causal"),
    (DEMO, mx.bfloat16, 64, 64, "bool_empty_row"),
    (DEMO, mx.bfloat16, 80, 80, "causal"),
    (DEMO, mx.bfloat16, 96, 96, "structured"),
    (DEMO, mx.bfloat16, 128, 128, "additive"),
]


def _project_id(case):
    module, dtype, dim, value_dim, mask = case
    return f"{module.name}-{str(dtype).split('.')[-1]}-D{dim}-Dv{value_dim}-{mask}"


@pytest.mark.parametrize("case", PROJECT_CASES, ids=_project_id)
def test_project_kernels_pass_every_check(case):
    # The strict pass (as called and with inputs in constant memory), the
    # fast-math accuracy, every schedule and the address-based race detector,
    # against the oracle within the kernel tests' own tolerances.
    module, dtype, dim, value_dim, mask_kind = case
    tolerances = oracle.TOLERANCES[module.name]
    q, k, v, dout, mask, sinks = _inputs_and_mask(dtype, dim, value_dim, mask_kind)
    scale = dim ** -0.5
    expected_out, expected_grads, _ = kernel_checks.kernel_oracle(q, k, v, dout, scale, mask, sinks)
    with emulator.metal(schedule=emulator.CHECKED_SCHEDULES, math="fast", strict=True) as session:
        out, _, grads = kernel_checks.run_kernels(module, q, k, v, dout, scale, mask, sinks)
    assert len(session.strict_reports) == 3
    for report in session.strict_reports:
        assert 0 < report.total_threadgroup_bytes <= 32 * 1024
    assert_close(out, expected_out, tolerances[dtype], "output")
    for grad, expected, name in zip(grads, expected_grads, ("dq", "dk", "dv", "dsinks")):
        assert_close(grad, expected, tolerances[dtype], name)
