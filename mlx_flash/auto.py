"""``import mlx_flash.auto`` patches mlx-lm on import.

    import mlx_flash.auto  # every mlx-lm model now uses mlx-flash attention

Environment variables, for A/B runs without editing code:

* ``MLX_FLASH_VARIANT``: the variant to patch with (one of
  ``mlx_flash.VARIANTS``; default ``auto``).
* ``MLX_FLASH_DISABLE=1``: do not patch at all.
"""

import os

from .attention import check_variant
from .patch import patch

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("", "0", "false", "no", "off")


def _disabled() -> bool:
    value = os.environ.get("MLX_FLASH_DISABLE", "").strip().lower()
    if value not in _TRUE + _FALSE:
        raise ValueError(
            f"[mlx_flash.auto] MLX_FLASH_DISABLE='{value}' is not understood: "
            "use 1 to disable the patch or 0 (or leave it unset) to keep it."
        )
    return value in _TRUE


def _variant() -> str:
    variant = os.environ.get("MLX_FLASH_VARIANT", "auto").strip() or "auto"
    return check_variant(variant, "mlx_flash.auto: MLX_FLASH_VARIANT")


if not _disabled():
    patch(_variant())
