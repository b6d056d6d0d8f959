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

Sliding windows and documents reach the op as structure, never as an
``L x L`` array, in training (no KV cache):

* ``create_attention_mask`` (base's function, wherever a model module holds
  it) is rebound too. Called without a cache for a window shorter than the
  sequence, it still returns mlx-lm's own mask array, built lazily (never
  evaluated unless someone uses it), and remembers it; when that array
  reaches the patched attention, the op runs ``mask="causal",
  window=W`` instead, so the dense mask is never computed. Anything else
  (another use of the array, a cache, a mask the model changed) keeps
  mlx-lm's array as it is.
* Inside ``with mlx_flash.segments(ids):`` self-attention calls get
  ``segment_ids=ids`` (``mlx_flash.documents``).
* Sinks (gpt-oss) are passed to the op, which fuses them with their gradient.
* A ``mlx_flash.context.SliceCache`` (one rank's slice of context-parallel
  rows) sends the call to ``mlx_flash.context.attention``.

With a KV cache (generation) mlx-lm's own masks and caches are kept, so
generation is unchanged. Quantized KV caches (``cache.bits``) go to mlx-lm's
own quantized attention, unchanged.
"""

import importlib.abc
import sys
import threading
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Optional, Tuple

import mlx.core as mx

from . import context, documents
from .attention import MLX_ATTENTION, check_variant
from .attention import scaled_dot_product_attention as flash_attention

#: The text that marks a module calling MLX's fused attention directly.
_DIRECT_CALL = "mx.fast.scaled_dot_product_attention"


class _State:
    active = False
    variant = "auto"
    #: mlx-lm's own ``base.scaled_dot_product_attention``, kept from the first patch.
    original = None
    #: mlx-lm's own ``base.create_attention_mask``.
    original_mask = None


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


class _WindowMasks:
    """The window masks ``create_attention_mask`` returned, by identity.

    Holds each array weakly, so a mask is forgotten when mlx-lm drops it;
    a lookup checks identity, so a new array that happens to reuse an old
    one's ``id`` is never mistaken for it.
    """

    def __init__(self):
        self._entries = {}
        self._lock = threading.Lock()

    def add(self, array: mx.array, length: int, window: int) -> None:
        key = id(array)

        def forget(_, key=key):
            with self._lock:
                self._entries.pop(key, None)

        with self._lock:
            self._entries[key] = (weakref.ref(array, forget), length, window)

    def find(self, array) -> Optional[Tuple[int, int]]:
        """``(length, window)`` of a remembered mask, or None."""
        with self._lock:
            entry = self._entries.get(id(array))
        if entry is None or entry[0]() is not array:
            return None
        return entry[1], entry[2]


_window_masks = _WindowMasks()


def create_attention_mask(h, cache=None, window_size: Optional[int] = None, return_array: bool = False):
    """mlx-lm's ``create_attention_mask``, remembering training window masks.

    Returns exactly what mlx-lm returns. Without a cache, for a window
    shorter than the sequence, the returned array is remembered so that the
    patched attention can run it as ``window=`` (it is then never evaluated).
    """
    mask = _state.original_mask(h, cache, window_size=window_size, return_array=return_array)
    has_cache = bool(cache) and hasattr(cache, "make_mask")  # mlx-lm's own test
    if _state.active and not has_cache and window_size and isinstance(mask, mx.array):
        _window_masks.add(mask, h.shape[1], window_size)
    return mask


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
    ``bits``, which go to mlx-lm's own quantized path. ``mask`` is
    whatever mlx-lm passes: ``None``, ``"causal"`` or an array (causal,
    sliding-window, padding); a training window mask from the patched
    ``create_attention_mask`` becomes ``window=``.
    """
    original = _state.original
    if not _state.active or hasattr(cache, "bits"):
        return original(queries, keys, values, cache, scale=scale, mask=mask, sinks=sinks)
    if isinstance(cache, context.SliceCache):
        return context.attention(queries, keys, values, cache, scale=scale, mask=mask, sinks=sinks, variant=_state.variant)
    structure = {}
    window = _window_masks.find(mask) if isinstance(mask, mx.array) else None
    if window is not None and window[0] == queries.shape[2] == keys.shape[2]:
        mask, structure["window"] = "causal", window[1]
    ids = documents.for_call(queries, keys)
    if ids is not None:
        structure["segment_ids"] = ids
    return flash_attention(
        queries, keys, values, scale=scale, mask=mask, sinks=sinks, variant=_state.variant, **structure
    )


def _fast_attention(q, k, v, *, scale, mask=None, sinks=None, **kwargs):
    """``mx.fast.scaled_dot_product_attention`` as the ``mx`` proxy gives it."""
    if not _state.active:
        return MLX_ATTENTION(q, k, v, scale=scale, mask=mask, sinks=sinks, **kwargs)
    return flash_attention(q, k, v, scale=scale, mask=mask, sinks=sinks, variant=_state.variant, **kwargs)


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
        elif value is _state.original_mask:
            namespace[name] = create_attention_mask
    # base's own function calls mx.fast too; it must stay the original.
    defines_original = module.__name__ == _state.original.__module__
    if not defines_original and namespace.get("mx") is mx and _calls_fast_directly(module):
        namespace["mx"] = _mx_proxy


def _unpatch_module(module) -> None:
    namespace = vars(module)
    for name, value in list(namespace.items()):
        if value is scaled_dot_product_attention:
            namespace[name] = _state.original
        elif value is create_attention_mask:
            namespace[name] = _state.original_mask
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
            _state.original_mask = base.create_attention_mask
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


context.mlx_lm_patched = is_patched


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
