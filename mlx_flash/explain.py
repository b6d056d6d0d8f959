"""``explain()``: which implementation would run, why, and how mlx-lm is patched.

It sits above both the op (``attention.py``) and the mlx-lm patch
(``patch.py``), so that neither needs the other to report itself.
"""

from dataclasses import replace

from .attention import Plan, _check_inputs, _check_structure, check_variant, plan
from .patch import patch_state


def explain(
    q,
    k,
    v,
    *,
    mask=None,
    sinks=None,
    segment_ids=None,
    window=None,
    variant: str = "auto",
    force_fused: bool = False,
) -> Plan:
    """Which implementation ``scaled_dot_product_attention`` would run, and why.

    Takes the same arguments (``scale`` is not needed) and raises the same
    errors. For ``auto`` on Metal, asking validates a kernel nobody
    validated on this machine, as the call would (once per verdict key;
    ``mlx_flash.verdicts``). ``str()`` of the result reads like::

        blockwise (mlx ops): Metal is not available on this machine: using blockwise; causal + segments: tiles ...
        mlx-lm attention is not patched
    """
    _check_inputs(q, k, v, mask, sinks)
    check_variant(variant)
    _check_structure(q, k, mask, segment_ids, window, force_fused, variant)
    chosen = plan(
        q, k, v, mask=mask, sinks=sinks, segment_ids=segment_ids, window=window, variant=variant, force_fused=force_fused
    )
    return replace(chosen, patch=str(patch_state()))
