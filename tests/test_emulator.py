"""The Metal emulator against NumPy on small kernels written for the purpose."""

import re

import mlx.core as mx
import numpy as np
import pytest

from mlx_flash import emulator


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
