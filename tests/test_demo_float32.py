"""float32 on the demo kernels: ``simdgroup_matrix<float, 8, 8>`` products.

The same kernel sources as float16 and bfloat16 with float32 operands and
``demo.FLOAT32_TILES``; checked against autodiff through the float32
reference (forward, every gradient, the sinks'), through the emulator under
every checked schedule with race detection and the strict compile pass
(``kernel_checks.on_backend``).
"""

import mlx.core as mx
import pytest

import mlx_flash
from kernel_checks import BACKENDS, check_kernels_match_reference, random_inputs, segment_layout, structured
from mlx_flash import demo, emulator, families, oracle
from mlx_flash.bench import cost

TOLERANCES = oracle.TOLERANCES["demo"]

# (B, Hq, Hkv, L, D, segments, window, sinks): every head dim, GQA 1 and 2,
# more than one tile each way, documents, windows and sinks composed.
CASES = [
    (1, 2, 1, 40, 64, "padding", None, True),
    (1, 2, 2, 37, 128, None, 9, True),
    (1, 4, 2, 33, 80, "spanning", 12, False),
    (2, 2, 1, 19, 96, "many", None, True),
]


def _id(case):
    B, n_q, n_kv, length, dim, segments, window, sinks = case
    return f"B{B}-G{n_q // n_kv}-L{length}-D{dim}-{segments}-w{window}-s{int(sinks)}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=_id)
def test_float32_matches_reference(backend, case):
    B, n_q, n_kv, length, dim, segments, window, with_sinks = case
    q, k, v, dout = random_inputs(B, n_q, n_kv, length, length, dim, dim, mx.float32, seed=length + dim)
    ids = mx.array(segment_layout(segments, B, length, seed=dim)) if segments else None
    mask = structured(length, length, "causal", ids, window)
    sinks = mx.linspace(-1.0, 1.0, n_q) if with_sinks else None
    check_kernels_match_reference(families.DEMO, backend, q, k, v, dout, mask, TOLERANCES, sinks=sinks)


def test_float32_products_are_all_on_the_matrix_path():
    # Every FLOP the kernels' loops issue is a counted simdgroup_matrix
    # multiply-accumulate (8x8x8, 2 FLOPs each): no scalar FMA products.
    case = cost.Case("demo", 64, 64, "causal+docs16", q_heads=2, kv_heads=1, precision="float32")
    for cell in cost.count(case):
        assert cell["flops"]["counted"] == cell["flops"]["issued"] > 0, cell["kernel"]
        assert cell["dtype"] == "float32"


def test_float32_tiles_stay_within_their_budgets():
    for dim in demo.HEAD_DIMS:
        tiles = demo.FLOAT32_TILES[dim]
        used = tiles.threadgroup_bytes(dim, 4)
        registers = tiles.registers(dim, 4)
        assert all(0 < b <= demo.FLOAT32_THREADGROUP_BYTES_BUDGET for b in used.values()), (dim, used)
        assert all(0 < r <= demo.FLOAT32_REGISTER_BUDGET for r in registers.values()), (dim, registers)
        if dim < 128:  # the half budgets hold below D = 128
            assert all(b <= demo.THREADGROUP_BYTES_BUDGET for b in used.values()), (dim, used)
            assert all(r <= demo.REGISTER_BUDGET for r in registers.values()), (dim, registers)
    # D = 128: rows of 136 floats; forward K and V tiles of 16 keys and 16
    # ids; dkdv 32 keys of k, 8 queries of q and dout, 3 x 8 floats.
    assert demo.FLOAT32_TILES[128].threadgroup_bytes(128, 4) == {"forward": 17472, "dq": 8736, "dkdv": 26208}
    # Q, O: 2 words per fragment each (16 fragments); S, P: 2 each (2 fragments).
    assert demo.FLOAT32_TILES[128].registers(128, 4) == {"forward": 72, "dq": 102, "dkdv": 104}
    # The half formulas are the size-2 case.
    assert demo.TILES[128].registers(128, 2) == {"forward": 54, "dq": 74, "dkdv": 86}


def test_auto_and_demo_take_float32():
    q = mx.zeros((1, 2, 64, 128), mx.float32)
    ids = mx.zeros((1, 64), mx.int32)
    x = mx.zeros((1, 1, 4, 80), mx.float32)
    assert demo.unsupported_reason(x, x, x, structured(4, 4, "causal")) is None
    with emulator.metal(schedule="forward"):
        requested = mlx_flash.explain(q, q, q, mask="causal", segment_ids=ids, variant="demo")
        chosen = mlx_flash.explain(q, q, q, mask="causal", segment_ids=ids, variant="auto")
    assert requested.implementation == "demo", str(requested)
    assert chosen.implementation == "demo", str(chosen)
    wrong = mx.zeros((1, 1, 4, 64), mx.int32)
    reason = demo.unsupported_reason(wrong, wrong, wrong, structured(4, 4))
    assert reason == "int32 inputs: demo runs float16, bfloat16 and float32"
