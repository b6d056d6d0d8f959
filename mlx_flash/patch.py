"""Make mlx-lm models use ``mlx_flash.scaled_dot_product_attention``.

    import mlx_flash
    mlx_flash.patch()              # every mlx-lm model, loaded now or later
    with mlx_flash.patched("manual"):
        ...                        # patched for this block only
    mlx_flash.unpatch()            # the original objects are back

mlx-lm reaches attention in two ways, and both are rebound:

* Almost every model module does ``from .base import
  scaled_dot_product_attention``, so it holds its own reference to the
  function. ``patch()`` rebinds every reference to that function (by identity)
  in the loaded ``mlx_lm`` modules, ``mlx_lm.models.base`` included. A model
  module imported later copies the rebound name from ``base``.
* A few modules call ``mx.fast.scaled_dot_product_attention`` directly. Their
  module global ``mx`` (and only theirs) is replaced by a proxy that forwards
  every attribute to ``mlx.core`` except ``fast.scaled_dot_product_attention``.
  ``mx.fast`` itself is never touched, so code outside mlx-lm is unaffected.

mlx-lm imports model modules lazily by ``model_type``; an import hook at the
front of ``sys.meta_path`` patches each ``mlx_lm`` module right after it
executes, then hands the module back with its own loader, as if no hook were
there.

``unpatch()`` puts back the original function and ``mlx.core`` wherever the
patched objects are found in ``mlx_lm`` modules and removes the hook. The
replacement function also checks whether the patch is still on and calls
mlx-lm's original when it is not, so a reference someone copied while patched
behaves as the original after ``unpatch()``.

Quantized KV caches (``cache.bits``) go to mlx-lm's own quantized attention,
unchanged.
"""

import importlib.abc
import sys
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional, Tuple

import mlx.core as mx

from .attention import check_variant
from .attention import scaled_dot_product_attention as flash_attention

#: The text that marks a module calling MLX's fused attention directly.
_DIRECT_CALL = "mx.fast.scaled_dot_product_attention"


class _State:
    active = False
    variant = "auto"
    #: mlx-lm's own ``base.scaled_dot_product_attention``, kept from the first patch.
    original = None


_state = _State()
_lock = threading.RLock()


@dataclass(frozen=True)
class PatchState:
    """What ``patch()`` has done, as ``patch_state()`` reports it.

    ``modules`` names the loaded mlx-lm modules whose attention now goes
    through mlx-flash; ``direct`` is the subset that called
    ``mx.fast.scaled_dot_product_attention`` directly and got the ``mx`` proxy.
    """

    active: bool
    variant: Optional[str]
    modules: Tuple[str, ...]
    direct: Tuple[str, ...]

    def __str__(self) -> str:
        if not self.active:
            return "mlx-lm attention is not patched"
        return (
            f"mlx-lm attention patched with variant '{self.variant}' in "
            f"{len(self.modules)} loaded modules ({len(self.direct)} through the mx proxy); "
            "model modules imported later are patched on import"
        )


def scaled_dot_product_attention(
    queries: mx.array,
    keys,
    values,
    cache,
    scale: float,
    mask,
    sinks: Optional[mx.array] = None,
) -> mx.array:
    """mlx-lm's ``scaled_dot_product_attention``, run by mlx-flash.

    Same signature as ``mlx_lm.models.base``'s, same results up to float
    rounding: ``queries`` is ``(B, Hq, Lq, D)``, ``keys`` and ``values`` are
    ``(B, Hkv, Lk, D)`` arrays, or the quantized triples of a cache with
    ``bits``, which go to mlx-lm's quantized path as before. ``mask`` is whatever mlx-lm passes: ``None``,
    ``"causal"`` or an array (causal, sliding-window, padding).
    """
    original = _state.original
    if not _state.active or hasattr(cache, "bits"):
        return original(queries, keys, values, cache, scale=scale, mask=mask, sinks=sinks)
    return flash_attention(
        queries, keys, values, scale=scale, mask=mask, sinks=sinks, variant=_state.variant
    )


def _fast_attention(q, k, v, *, scale, mask=None, sinks=None, **kwargs):
    """``mx.fast.scaled_dot_product_attention`` as the ``mx`` proxy gives it.

    MLX-only keyword arguments (``stream``, ``force_fused``) keep MLX's op.
    """
    if not _state.active or kwargs:
        return mx.fast.scaled_dot_product_attention(
            q, k, v, scale=scale, mask=mask, sinks=sinks, **kwargs
        )
    return flash_attention(q, k, v, scale=scale, mask=mask, sinks=sinks, variant=_state.variant)


class _FastProxy:
    """``mlx.core.fast`` with ``scaled_dot_product_attention`` replaced."""

    scaled_dot_product_attention = staticmethod(_fast_attention)

    def __getattr__(self, name):
        return getattr(mx.fast, name)

    def __repr__(self) -> str:
        return "<mlx.core.fast, attention patched by mlx_flash>"


class _CoreProxy:
    """``mlx.core`` with ``fast`` replaced by ``_FastProxy``."""

    fast = _FastProxy()

    def __getattr__(self, name):
        return getattr(mx, name)

    def __repr__(self) -> str:
        return "<mlx.core, attention patched by mlx_flash>"


_mx_proxy = _CoreProxy()


def _is_mlx_lm(name: str) -> bool:
    return name == "mlx_lm" or name.startswith("mlx_lm.")


def _calls_fast_directly(module) -> bool:
    path = getattr(module, "__file__", None)
    if not path or not path.endswith(".py"):
        return False
    try:
        with open(path, encoding="utf-8") as f:
            return _DIRECT_CALL in f.read()
    except OSError:
        return False


def _patch_module(module) -> None:
    namespace = vars(module)
    for name, value in list(namespace.items()):
        if value is _state.original:
            namespace[name] = scaled_dot_product_attention
    # base's own function calls mx.fast too; it must stay the original.
    defines_original = module.__name__ == _state.original.__module__
    if not defines_original and namespace.get("mx") is mx and _calls_fast_directly(module):
        namespace["mx"] = _mx_proxy


def _unpatch_module(module) -> None:
    namespace = vars(module)
    for name, value in list(namespace.items()):
        if value is scaled_dot_product_attention:
            namespace[name] = _state.original
        elif value is _mx_proxy:
            namespace[name] = mx


def _mlx_lm_modules():
    return [m for name, m in list(sys.modules.items()) if _is_mlx_lm(name) and m is not None]


class _PatchingLoader(importlib.abc.Loader):
    """Runs the real loader, patches the module, then leaves no trace of itself."""

    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        spec = module.__spec__
        # The real loader sees the spec it made, as on an ordinary import.
        spec.loader = self.loader
        module.__loader__ = self.loader
        self.loader.exec_module(module)
        with _lock:
            if _state.active:
                _patch_module(module)


class _ImportHook(importlib.abc.MetaPathFinder):
    """Patches ``mlx_lm`` modules that are imported while the patch is on."""

    def find_spec(self, fullname, path, target=None):
        if not _is_mlx_lm(fullname) or not _state.active:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                break
        else:
            return None
        if spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _PatchingLoader(spec.loader)
        return spec


_hook = _ImportHook()


def patch(variant: str = "auto") -> None:
    """Make every mlx-lm model use ``mlx_flash.scaled_dot_product_attention``.

    Covers the model modules loaded now and those imported later. Calling it
    again is harmless and switches to the new ``variant``.

    Args:
        variant: one of ``mlx_flash.VARIANTS``, passed to every attention call.
    """
    check_variant(variant, "patch")
    from mlx_lm.models import base

    with _lock:
        if _state.original is None:
            _state.original = base.scaled_dot_product_attention
        _state.variant = variant
        _state.active = True
        for module in _mlx_lm_modules():
            _patch_module(module)
        if _hook not in sys.meta_path:
            sys.meta_path.insert(0, _hook)


def unpatch() -> None:
    """Put back exactly the objects ``patch()`` replaced. Harmless if not patched."""
    with _lock:
        if _hook in sys.meta_path:
            sys.meta_path.remove(_hook)
        if _state.original is not None:
            for module in _mlx_lm_modules():
                _unpatch_module(module)
        _state.active = False


def is_patched() -> bool:
    """Whether mlx-lm attention currently goes through mlx-flash."""
    return _state.active


def patch_state() -> PatchState:
    """The patch's variant and which loaded mlx-lm modules it covers."""
    with _lock:
        modules, direct = [], []
        for module in _mlx_lm_modules():
            namespace = vars(module)
            if namespace.get("mx") is _mx_proxy:
                direct.append(module.__name__)
                modules.append(module.__name__)
            elif any(value is scaled_dot_product_attention for value in namespace.values()):
                modules.append(module.__name__)
        return PatchState(
            active=_state.active,
            variant=_state.variant if _state.active else None,
            modules=tuple(sorted(modules)),
            direct=tuple(sorted(direct)),
        )


@contextmanager
def patched(variant: str = "auto"):
    """Patch mlx-lm for the ``with`` block, then return to the previous state.

    If the patch was already on, it stays on afterwards with its old variant.
    """
    with _lock:
        was_active, old_variant = _state.active, _state.variant
    patch(variant)
    try:
        yield
    finally:
        if was_active:
            patch(old_variant)
        else:
            unpatch()
