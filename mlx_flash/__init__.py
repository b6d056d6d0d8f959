"""mlx-flash: fused flash-attention forward and backward for MLX.

    import mlx_flash
    out = mlx_flash.scaled_dot_product_attention(q, k, v, scale=q.shape[-1] ** -0.5, mask="causal")
    print(mlx_flash.explain(q, k, v, mask="causal"))
    print(mlx_flash.doctor(quick=True))   # validate and time the kernels here (python -m mlx_flash.doctor)
"""

from .attention import VARIANTS, Plan, scaled_dot_product_attention
from .doctor import doctor
from .documents import segments
from .explain import explain
from .patch import is_patched, patch, patch_state, patched, unpatch
from .step import bound_activations
from .version import __version__

__all__ = [
    "bound_activations",
    "VARIANTS",
    "Plan",
    "doctor",
    "explain",
    "scaled_dot_product_attention",
    "segments",
    "patch",
    "unpatch",
    "patched",
    "is_patched",
    "patch_state",
    "__version__",
]
