"""What the tests share: one closeness check, with the tolerances of
``mlx_flash.oracle``, and the ``unpatched`` fixture.

``assert_close`` is ``oracle.mismatch`` as an assertion: ``max |actual -
expected| <= atol + rtol * max |expected|``, the same shape, and NaN exactly
where ``expected`` has NaN (rows whose additive mask is all ``-inf``, and
the gradients they reach). The kernel tests pass a kernel family's
``oracle.TOLERANCES``; ``python -m mlx_flash.doctor`` holds the kernels to
the same on a user's machine.
"""

import pytest

import mlx_flash
from mlx_flash import oracle


def assert_close(actual, expected, tolerance, what=""):
    """Assert ``actual`` is within ``tolerance`` of ``expected``.

    ``tolerance`` is ``(atol, rtol)`` or the name of a kernel family, whose
    ``oracle.TOLERANCES`` for ``actual``'s dtype apply.
    """
    if isinstance(tolerance, str):
        tolerance = oracle.TOLERANCES[tolerance][actual.dtype]
    problem = oracle.mismatch(actual, expected, tolerance)
    assert problem is None, f"{what}: {problem}"


@pytest.fixture
def unpatched():
    """mlx-lm's attention unpatched when the test starts and after it ends."""
    mlx_flash.unpatch()
    yield
    mlx_flash.unpatch()
