"""Declared performance targets, evaluated PASS/FAIL against measured cells.

A targets file is YAML with a list under ``targets``; each target is a bound
on the ratio of one metric between two sets of cells::

    - name: blockwise fwd+bwd peak memory at L=4096 is at least 8x below mlx
      source: the README's memory figure  # optional: where the bound comes from
      when: {backend: cpu}              # machines it applies to
      where: {mode: fwdbwd, seq: 4096, head_dim: 64, mask: causal}
      metric: peak_memory               # peak_memory, median_time or tokens_per_s
      numerator: {variant: mlx}
      denominator: {variant: blockwise}
      at_least: 8                       # and/or at_most

A target with neither ``numerator`` nor ``denominator`` bounds the metric
of each ``where`` cell itself, e.g. ``metric: peak_over_floor`` (peak memory
over the ``O(L)`` floor of q, k, v, the output, and with the backward the
cotangent and the gradients) with ``at_most: 2``.

``where``, ``numerator`` and ``denominator`` select cells by ``mode``,
``batch``, ``seq``, ``heads``, ``kv_heads``, ``head_dim``, ``mask``,
``dtype`` and ``variant``; a value is a scalar, a list of allowed values, or
``{min: .., max: ..}``. Each numerator cell is paired with the denominator
cell that agrees with it on every axis the two selectors do not name, and
every pair must meet the bound.

``when`` holds conditions on the machine (``backend``, ``os``, and ``chip``,
a substring of the chip name): where they do not hold the target is SKIP,
not FAIL. A target whose cells were not measured is NOT MEASURED. A pair in
which a cell failed its correctness check FAILs the target: a wrong answer
meets no target.
"""

import os
from typing import Dict, List, Optional

import yaml

#: The targets shipped with mlx-flash (``--targets`` with no file).
SHIPPED = os.path.join(os.path.dirname(os.path.abspath(__file__)), "targets.yaml")

AXES = ("mode", "batch", "seq", "heads", "kv_heads", "head_dim", "mask", "dtype", "variant")
METRICS = {
    "peak_memory": "peak_memory_bytes",
    "median_time": "median_s",
    "tokens_per_s": "tokens_per_s",
    "peak_over_floor": "peak_over_floor",
}
MACHINE_KEYS = ("backend", "os", "chip")


def find(path: str) -> str:
    """``path``, or the shipped file where ``path`` is its old place in a checkout
    (``bench/targets.yaml``) and no such file exists here."""
    if not os.path.exists(path) and os.path.normpath(path) == os.path.join("bench", "targets.yaml"):
        return SHIPPED
    return path


def load(path: str) -> List[dict]:
    """The checked list of targets in the YAML file at ``path`` (see ``find``)."""
    path = find(path)
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except OSError as e:
        raise ValueError(f"--targets: cannot read {path} ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        raise ValueError(f"--targets: {path} is not valid YAML ({getattr(e, 'problem', None) or e})") from None
    targets = data.get("targets") if isinstance(data, dict) else None
    if not isinstance(targets, list):
        raise ValueError(f"{path}: expected a mapping with a list under 'targets'")
    for i, target in enumerate(targets):
        validate(target, f"{path}: target {i + 1}")
    return targets


def validate(target: dict, where: str = "target") -> None:
    """Raise ``ValueError`` if ``target`` is not of the documented form."""
    if not isinstance(target, dict) or not target.get("name"):
        raise ValueError(f"{where}: each target needs a 'name'")
    where = f"{where} ({target['name']})"
    if target.get("metric") not in METRICS:
        raise ValueError(f"{where}: metric must be one of {', '.join(METRICS)}")
    if "at_least" not in target and "at_most" not in target:
        raise ValueError(f"{where}: give 'at_least' and/or 'at_most'")
    for key in ("where", "numerator", "denominator"):
        selector = target.get(key, {})
        if not isinstance(selector, dict):
            raise ValueError(f"{where}: '{key}' must be a mapping")
        bad = set(selector) - set(AXES)
        if bad:
            raise ValueError(f"{where}: '{key}' has unknown axes {sorted(bad)}; use {', '.join(AXES)}")
    bad = set(target.get("when") or {}) - set(MACHINE_KEYS)
    if bad:
        raise ValueError(f"{where}: 'when' has unknown keys {sorted(bad)}; use {', '.join(MACHINE_KEYS)}")


def _matches(value, wanted) -> bool:
    if isinstance(wanted, dict):
        low, high = wanted.get("min"), wanted.get("max")
        return (low is None or value >= low) and (high is None or value <= high)
    if isinstance(wanted, list):
        return value in wanted
    return value == wanted


def _selected(cell: dict, *selectors: dict) -> bool:
    return all(_matches(cell.get(axis), wanted) for s in selectors for axis, wanted in s.items())


def applies(target: dict, machine: dict) -> Optional[str]:
    """None if the target applies to ``machine``, else why not."""
    for key, wanted in (target.get("when") or {}).items():
        if key == "chip":
            have = machine.get("chip", "")
            if str(wanted).lower() not in have.lower():
                return f"chip '{have}' is not '{wanted}'"
            continue
        have = machine.get("os_name" if key == "os" else key)
        options = wanted if isinstance(wanted, list) else [wanted]
        if have not in options:
            return f"{key} is {have}, target is for {wanted}"
    return None


def _bound_text(target: dict) -> str:
    parts = []
    if "at_least" in target:
        parts.append(f">= {target['at_least']:g}")
    if "at_most" in target:
        parts.append(f"<= {target['at_most']:g}")
    return " and ".join(parts)


def _label(cell: dict, axes) -> str:
    return ", ".join(f"{axis}={cell[axis]}" for axis in axes)


def evaluate_one(target: dict, cells: List[dict], machine: dict) -> dict:
    """The verdict on one target: ``status`` PASS, FAIL, SKIP or NOT MEASURED."""
    result = {"name": target["name"], "pairs": []}
    if target.get("source"):
        result["source"] = target["source"]
    why_not = applies(target, machine)
    if why_not:
        return {**result, "status": "SKIP", "detail": f"not applicable: {why_not}"}
    where = target.get("where") or {}
    top, bottom = target.get("numerator") or {}, target.get("denominator") or {}
    varying = [axis for axis in AXES if axis in top or axis in bottom]
    shared = [axis for axis in AXES if axis not in varying]
    field = METRICS[target["metric"]]

    tops = [c for c in cells if _selected(c, where, top)]
    bottoms = {tuple(c[a] for a in shared): c for c in cells if _selected(c, where, bottom)}
    single = not top and not bottom  # the metric of each cell itself
    failed, passed, unmeasured = [], [], []
    for t in tops:
        b = t if single else bottoms.get(tuple(t[a] for a in shared))
        if b is None:
            continue
        pair = {"numerator": _label(t, AXES), "denominator": "" if single else _label(b, varying)}
        wrong = [c for c in {id(t): t, id(b): b}.values() if c["status"] in ("FAILED", "error")]
        if wrong:
            pair["detail"] = "; ".join(f"{c['variant']} {c['status']}" for c in wrong)
            failed.append(pair)
        elif t["status"] != "ok" or b["status"] != "ok" or not t.get(field) or not b.get(field):
            pair["detail"] = "not measured (" + ", ".join(c["status"] for c in (t, b)) + ")"
            unmeasured.append(pair)
        else:
            ratio = t[field] if single else t[field] / b[field]
            pair["ratio"] = ratio
            ok = ("at_least" not in target or ratio >= target["at_least"]) and (
                "at_most" not in target or ratio <= target["at_most"]
            )
            (passed if ok else failed).append(pair)
        result["pairs"].append(pair)

    bound = _bound_text(target)
    ratios = [p["ratio"] for p in result["pairs"] if "ratio" in p]
    measured = f"ratio {min(ratios):.2f}" if len(ratios) == 1 else (
        f"ratios {min(ratios):.2f}..{max(ratios):.2f}" if ratios else "")
    if failed:
        status = "FAIL"
        detail = f"{len(failed)} of {len(result['pairs'])} pairs miss {bound}"
        if measured:
            detail += f"; {measured}"
        reasons = [p["detail"] for p in failed if "detail" in p]
        if reasons:
            detail += "; " + "; ".join(reasons)
    elif passed:
        status = "PASS"
        detail = f"{measured} {bound}"
        if unmeasured:
            detail += f" ({len(passed)} of {len(result['pairs'])} pairs measured)"
    else:
        status = "NOT MEASURED"
        detail = "no measured cells match this target"
        if unmeasured:
            detail += ": " + "; ".join(p["detail"] for p in unmeasured)
    return {**result, "status": status, "detail": detail}


def evaluate(targets: List[dict], cells: List[dict], machine: dict) -> List[dict]:
    """Evaluate every target against ``cells`` (dicts as in the JSON report)."""
    return [evaluate_one(t, cells, machine) for t in targets]


def any_failed(results: List[Dict]) -> bool:
    return any(r["status"] == "FAIL" for r in results)
