"""The optimized BLAS: in effect in the test process, chosen by the commands,
named by the doctor, and the same numbers as the reference BLAS."""

import os
import subprocess
import sys

import mlx.core as mx
import numpy as np
import pytest

from mlx_flash import blas

linux_only = pytest.mark.skipif(sys.platform != "linux", reason="MLX uses Accelerate on macOS; no preload there")


def _env(**changes):
    env = dict(os.environ)
    for name in ("LD_PRELOAD", blas.ENV, "MLX_FLASH_BLAS_REEXECUTED"):
        env.pop(name, None)
    env.update(changes)
    return env


def _doctor_blas(env) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "mlx_flash.doctor", "--blas"], env=env, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


@linux_only
def test_optimized_blas_is_in_effect_in_the_test_process():
    # `make test` installs OpenBLAS and preloads it: on the reference BLAS
    # every float32 product in the suite runs 30x+ slower.
    assert blas.optimized_library() is not None, f"no optimized BLAS installed: {blas.INSTALL_HINT}"
    used = blas.in_use()
    assert used.optimized, f"MLX's products run on {used}"
    assert os.path.realpath(used.path) == os.path.realpath(blas.optimized_library())


@linux_only
def test_a_command_started_without_the_preload_re_executes_with_it():
    if blas.optimized_library() is None:
        pytest.fail(f"no optimized BLAS installed: {blas.INSTALL_HINT}")
    out = _doctor_blas(_env())
    assert out.startswith("BLAS: OpenBLAS") or out.startswith("BLAS: BLIS"), out
    assert "warning" not in out


@linux_only
def test_the_switch_keeps_the_shipped_reference_blas_and_the_doctor_says_so():
    out = _doctor_blas(_env(**{blas.ENV: "off"}))
    assert out.startswith("BLAS: reference"), out
    assert f"{blas.ENV}=off" in out


def test_products_agree_with_float64_numpy_within_float32_rounding():
    rng = np.random.default_rng(0)
    a = rng.standard_normal((257, 300)).astype(np.float32)
    b = rng.standard_normal((300, 129)).astype(np.float32)
    got = np.array(mx.matmul(mx.array(a), mx.array(b), stream=mx.cpu))
    want = a.astype(np.float64) @ b.astype(np.float64)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())
