"""What the kernel-family tests share: where kernels run, random inputs,
masks and segment layouts, the float32 oracle and the kernels run one by one
against it (the inputs, the oracle and the tolerances live in
``mlx_flash.oracle``, which ``python -m mlx_flash.doctor`` checks the
kernels with on a Mac; the closeness check is ``conftest.assert_close``).

Every kernel test runs on each backend that can run Metal kernels here: the
CPU emulator always, real Metal too where ``mx.metal.is_available()``. On the
emulator every launch runs under four thread schedules (``SCHEDULES``) with
threadgroup-memory race detection by address: an access pair no barrier
orders, or results that differ between the schedules, raise ``RaceError``; a
barrier or SIMD collective that not every thread reaches raises
``DivergenceError``. Math runs at Metal's fast-math accuracy, and every
kernel source goes through the strict compile pass first (``StrictError``
for what Apple's compiler would reject).

The kernels' own contract (``mlx_flash.fused``) is checked here, below the
dispatcher: a row that keeps no key returns zeros, no gradient and
log-sum-exp ``+inf`` (what MLX's uniform rows become is the dispatcher's
business and is tested in ``test_attention.py``).
"""

import contextlib

import mlx.core as mx

from conftest import assert_close
from mlx_flash import emulator, masks, oracle, validation
from mlx_flash.call import AttentionCall
from mlx_flash.oracle import kernel_oracle, oracle_lse, random_inputs, random_mask, segment_layout  # noqa: F401

BACKENDS = ["emulator"] + (["metal"] if mx.metal.is_available() else [])
#: Threads forward and reversed, and one SIMD group at a time running ahead
#: to its next barrier (forward and reversed): a race between SIMD groups
#: changes the results under the last two.
SCHEDULES = emulator.CHECKED_SCHEDULES


def on_backend(backend, schedule=SCHEDULES):
    """Where Metal kernels run inside the block: on the emulator, under every
    schedule of ``schedule``, with the address-based race detector, Metal's
    fast-math accuracy for every non-``precise::`` function, and the strict
    compile pass (what Apple's compiler rejects) on every kernel source."""
    if backend == "metal":
        return contextlib.nullcontext()
    return emulator.metal(schedule=schedule, math="fast", strict=True)


def run_kernels(family, q, k, v, dout, scale, mask, sinks=None):
    """Output, lse and (dq, dk, dv[, dsinks]) from the three launchers of
    ``family`` (a ``mlx_flash.families.Family``), on a ``StructuredMask``
    (or None / "causal" / an array)."""
    if not isinstance(mask, masks.StructuredMask):
        mask = masks.build(q.shape[2], k.shape[2], mask)
    results = dict(validation.kernel_stages(family, AttentionCall(q, k, v, scale, mask, sinks), dout))
    out, lse = results["forward"]
    grads = (results["dq"][0],) + results["dkdv"] + results.get("sinks", ())
    return out, lse, grads


def assert_lse_close(lse, expected, tolerance, what="lse"):
    """Finite log-sum-exps close, ``+inf`` (a row that keeps no key) and
    ``-inf`` (a row whose kept scores are all ``-inf``) exactly where
    expected."""
    problem = oracle.lse_mismatch(lse, expected, tolerance)
    assert problem is None, f"{what}: {problem}"


def check_kernels_match_reference(family, backend, q, k, v, dout, mask, tolerances, sinks=None):
    """``family``'s forward and backward kernels against the oracle: output
    and (dq, dk, dv) in ``q``'s dtype and the sinks' gradient within
    ``tolerances[dtype]``, and a float32 log-sum-exp."""
    dtype = q.dtype
    scale = q.shape[-1] ** -0.5
    expected_out, expected_grads, expected_lse = kernel_oracle(q, k, v, dout, scale, mask, sinks)

    with on_backend(backend):
        out, lse, grads = run_kernels(family, q, k, v, dout, scale, mask, sinks)

    assert out.dtype == dtype and lse.dtype == mx.float32
    assert_close(out, expected_out, tolerances[dtype], "output")
    assert_lse_close(lse, expected_lse, oracle.lse_tolerance(dtype))
    for grad, expected, name in zip(grads, expected_grads, ("dq", "dk", "dv", "dsinks")):
        assert_close(grad, expected, tolerances[dtype], name)


def structured(q_len, k_len, mask=None, segments=None, window=None):
    """A ``StructuredMask`` from public-style arguments (normalised)."""
    return masks.build(q_len, k_len, mask, segments, window)

