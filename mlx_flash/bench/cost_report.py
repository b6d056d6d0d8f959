"""The cost report: targets, Markdown and JSON of ``python -m mlx_flash.bench --cost``.

``results`` is the JSON document: ``schema``, ``machine``
(``mlx_flash.machine.describe``), ``settings``, ``cells`` (one per kernel
and case, ``mlx_flash.bench.cost.cell``), optionally ``before`` (cells of an
earlier commit's kernels, ``bench/emulator-cost/before.py``) and
``targets``.
"""

import os
from typing import Dict, List, Optional

from .. import demo
from . import report
from .cost import practical_alu

SCHEMA = "mlx-flash-cost/1"

#: The targets of the cost report: a bound on one metric of every cell that
#: ``where`` selects (a value or a tuple of allowed values per field).
TARGETS = (
    {
        "name": "demo forward and dQ at D=128, causal, L=4096: tensor bytes within 1.5x of the tiling bound",
        "where": {"family": "demo", "kernel": ("forward", "dq"), "head_dim": 128, "mask": "causal", "seq": 4096},
        "metric": "bytes_over_tiling",
        "at_most": 1.5,
    },
    {
        "name": "practical non-MMA ALU work per evaluated pair at most 2x the scalar minimum (seeded normal inputs)",
        "where": {"family": "practical"},
        "metric": "alu_over_scalar",
        "at_most": 2.0,
    },
    {
        "name": "demo, float32 included: every product on the matrix path (FLOPs its visits issue, less the "
                "counted simdgroup_matrix FLOPs)",
        "where": {"family": "demo"},
        "metric": "flops_off_matrix",
        "at_most": 0,
    },
    {
        "name": "demo mask-and-metadata bytes at most 10% of tensor bytes in every kernel",
        "where": {"family": "demo"},
        "metric": "mask_metadata_over_tensor",
        "at_most": 0.10,
    },
    {
        "name": "practical mask-and-metadata bytes at most 25% of tensor bytes in every kernel",
        "where": {"family": "practical"},
        "metric": "mask_metadata_over_tensor",
        "at_most": 0.25,
    },
    {
        "name": "every counted half-precision demo configuration at most 16 KB of threadgroup memory per threadgroup",
        "where": {"family": "demo", "dtype": ("float16", "bfloat16")},
        "metric": "threadgroup_peak_bytes",
        "at_most": demo.THREADGROUP_BYTES_BUDGET,
    },
    {
        "name": "every counted float32 demo configuration at most 28 KB of threadgroup memory per threadgroup",
        "where": {"family": "demo", "dtype": "float32"},
        "metric": "threadgroup_peak_bytes",
        "at_most": demo.FLOAT32_THREADGROUP_BYTES_BUDGET,
    },
)

#: Against mlx-train-perf (``mlx_flash.bench.peer``): float32 demo's tensor
#: bytes at most its full-slab variant's, kernel by kernel, on every problem
#: both counted.
PEER_TARGET = "float32 demo at D=64 and 128, causal and packed: tensor bytes at most mlx-train-perf's full-slab variant's"


def metric(cell: dict, name: str) -> float:
    if name == "bytes_over_tiling":
        return cell["bytes"]["tensor"] / cell["bytes"]["tiling"]
    if name == "alu_over_scalar":
        return practical_alu(cell)["ratio"]
    if name == "mask_metadata_over_tensor":
        return mask_metadata_ratio(cell)
    if name == "flops_off_matrix":
        return cell["flops"]["issued"] - cell["flops"]["counted"]
    return cell[name]


def mask_metadata_ratio(cell: dict) -> float:
    """Device bytes of the mask data (ids, id ranges, an array, sinks) and
    the metadata (params, shapes, strides) over the tensor bytes."""
    b = cell["bytes"]
    return (b["mask"] + b["metadata"]) / b["tensor"]


def _selected(cell: dict, where: dict) -> bool:
    return all(cell[k] in (v if isinstance(v, tuple) else (v,)) for k, v in where.items())


def evaluate(cells: List[dict], peer: Optional[dict] = None) -> List[dict]:
    """PASS when every selected cell meets the bound, FAIL otherwise, NOT
    MEASURED when no cell is selected; last, ``PEER_TARGET`` on ``peer``
    (``results["peer"]``: mlx-train-perf's cells, or None)."""
    results = []
    for target in TARGETS:
        chosen = [c for c in cells if _selected(c, target["where"])]
        values = [metric(c, target["metric"]) for c in chosen]
        if not values:
            results.append({"name": target["name"], "status": "NOT MEASURED", "detail": "no counted cell matches"})
            continue
        bound = target["at_most"]
        failed = [(v, c) for v, c in zip(values, chosen) if v > bound]
        low, high = _number(min(values)), _number(max(values))
        detail = f"{len(values)} cells, {low if low == high else f'{low}..{high}'} (at most {_number(bound)})"
        if failed:
            detail += "; over: " + "; ".join(f"{_label(c)} {_number(v)}" for v, c in failed)
        results.append({"name": target["name"], "status": "FAIL" if failed else "PASS", "detail": detail})
    results.append(evaluate_peer(cells, peer))
    return results


def _problem_key(c: dict, kernel: Optional[str] = None) -> tuple:
    """A cell's problem and kernel, with its element size ("half" for
    float16 and bfloat16, which run the same source)."""
    size = "float32" if c["dtype"] == "float32" else "half"
    return (c["seq"], c["head_dim"], c["mask"], c["q_heads"], c["kv_heads"], size, kernel or c["kernel"])


def _peer_cell(peer_cells: List[dict], key: tuple, full_slab: bool) -> Optional[dict]:
    for p in peer_cells:
        if _problem_key(p) == key and (p["full_slab"] if full_slab else p["variant"] == "default"):
            return p
    return None


def evaluate_peer(cells: List[dict], peer: Optional[dict]) -> dict:
    """``PEER_TARGET``: NOT MEASURED without mlx-train-perf's cells."""
    chosen = [c for c in cells if c["family"] == "demo" and c["dtype"] == "float32" and c["head_dim"] in (64, 128)]
    pairs = []
    for c in chosen:
        theirs = _peer_cell(peer["cells"], _problem_key(c), full_slab=True) if peer else None
        if theirs is not None:
            pairs.append((c["bytes"]["tensor"] / theirs["bytes"]["tensor"], c))
    if not pairs:
        why = "mlx-train-perf not counted" if not peer else "no problem counted by both"
        return {"name": PEER_TARGET, "status": "NOT MEASURED", "detail": why}
    values = [v for v, _ in pairs]
    failed = [(v, c) for v, c in pairs if v > 1.0]
    detail = f"{len(values)} kernels, demo ÷ theirs {_number(min(values))}..{_number(max(values))} (at most 1)"
    if failed:
        detail += "; over: " + "; ".join(f"{_label(c)} {_number(v)}" for v, c in failed)
    return {"name": PEER_TARGET, "status": "FAIL" if failed else "PASS", "detail": detail}


def _number(value) -> str:
    """Byte counts with thousands separators, ratios to 3 digits."""
    if float(value).is_integer() and abs(value) >= 1000:
        return f"{int(value):,}"
    return f"{value:.3g}"


def _label(c: dict) -> str:
    return (f"{c['family']} {c['kernel']} D={c['head_dim']} L={c['seq']} {c['mask']} H={c['q_heads']}/{c['kv_heads']} "
            f"{c['dtype']}")


def _x(value: Optional[float]) -> str:
    return "" if value is None else f"{value:.2f}"


def _mb(n: int) -> str:
    return f"{n / 1e6:.1f}"


def _per_pair(c: dict, counts: Dict[str, int], lanes: int = 1) -> str:
    return f"{lanes * sum(counts.values()) / c['evaluated_pairs']:.2f}"


def _flops_ratio(c: dict) -> float:
    flops = c["flops"]["counted"] if c["flops"]["counted"] is not None else c["flops"]["issued"]
    return flops / c["flops"]["bound"]


def _cost_table(cells: List[dict]) -> List[str]:
    lines = [
        "| family | dtype | kernel | D | L | mask | Hq/Hkv | tiles | tg peak B | registers (est.) | tensor MB "
        "| ÷ tiling | ÷ minimum | mask MB | metadata MB | (mask + metadata) ÷ tensor | FLOPs ÷ bound "
        "| evaluated ÷ kept pairs "
        "| exp / pair | lane-collectives / pair | barriers | threadgroups counted |",
        "|" + "---|" * 22,
    ]
    for c in cells:
        b = c["bytes"]
        counted = c["threadgroups"]
        lines.append(
            f"| {c['family']} | {c['dtype']} | {c['kernel']} | {c['head_dim']} | {c['seq']} | {c['mask']} "
            f"| {c['q_heads']}/{c['kv_heads']} | {c['tiles']} | {c['threadgroup_peak_bytes']:,} | {c['registers_estimate'] or 'n/a'} "
            f"| {_mb(b['tensor'])} | {_x(b['tensor'] / b['tiling'])} | {_x(b['tensor'] / b['minimum'])} "
            f"| {_mb(b['mask'])} | {_mb(b['metadata'])} | {mask_metadata_ratio(c):.3f} | {_x(_flops_ratio(c))}"
            f"{'' if c['flops']['counted'] is not None else ' (from visits)'} "
            f"| {_x(c['evaluated_pairs'] / c['kept_pairs'])} "
            f"| {_per_pair(c, {k: v for k, v in c['math'].items() if k.startswith('exp')})} "
            f"| {_per_pair(c, c['collectives'], 32)} | {sum(c['barriers'].values()):,} "
            f"| {counted['counted']} × {counted['factor']} |"
        )
    return lines


def _alu_table(cells: List[dict]) -> List[str]:
    lines = [
        "| kernel | D | L | mask | Hq/Hkv | math calls (counted) | lane-collectives (counted) "
        "| butterfly max/add (counted shuffles) | code ops (source) | rescale exps | total "
        "| scalar minimum | ratio |",
        "|" + "---|" * 13,
    ]
    for c in cells:
        if c["family"] != "practical":
            continue
        a = practical_alu(c)
        lines.append(
            f"| {c['kernel']} | {c['head_dim']} | {c['seq']} | {c['mask']} | {c['q_heads']}/{c['kv_heads']} "
            f"| {a['math']:.3f} | {a['collectives']:.3f} | {a['butterfly']:.3f} | {a['code']:.3f} "
            f"| {a['rescales']:.4f} per pair | {a['total']:.2f} | {a['scalar_minimum']} | **{a['ratio']:.2f}** |"
        )
    return lines


def _key(c: dict) -> tuple:
    return (c["family"], c["kernel"], c["head_dim"], c["seq"], c["mask"], c["q_heads"], c["kv_heads"], c["dtype"])


def _before_after(before: List[dict], after: List[dict], commit: str, now: str) -> List[str]:
    now_by = {_key(c): c for c in after}
    lines = [
        f"| family | kernel | D | L | Hq/Hkv | tiles {commit} → {now} | tg peak B | tensor bytes ÷ tiling "
        "| tensor MB | (mask + metadata) ÷ tensor | FLOPs ÷ bound | exp / pair | lane-collectives / pair | barriers |",
        "|" + "---|" * 14,
    ]
    for b in before:
        a = now_by.get(_key(b))
        if a is None:
            continue

        def pair(f):
            return f"{f(b)} → {f(a)}"

        lines.append(
            f"| {b['family']} | {b['kernel']} | {b['head_dim']} | {b['seq']} | {b['q_heads']}/{b['kv_heads']} "
            f"| {b['tiles']} → {a['tiles']} "
            f"| {pair(lambda c: format(c['threadgroup_peak_bytes'], ','))} "
            f"| {pair(lambda c: _x(c['bytes']['tensor'] / c['bytes']['tiling']))} "
            f"| {pair(lambda c: _mb(c['bytes']['tensor']))} "
            f"| {pair(lambda c: format(mask_metadata_ratio(c), '.3f'))} "
            f"| {pair(lambda c: _x(_flops_ratio(c)))} "
            f"| {pair(lambda c: _per_pair(c, {k: v for k, v in c['math'].items() if k.startswith('exp')}))} "
            f"| {pair(lambda c: _per_pair(c, c['collectives'], 32))} "
            f"| {pair(lambda c: format(sum(c['barriers'].values()), ','))} |"
        )
    return lines


def _peer_table(cells: List[dict], peer_cells: List[dict]) -> List[str]:
    """Ours beside theirs, problem by problem and kernel by kernel."""
    lines = [
        "| D | L | mask | Hq/Hkv | kernel | ours | tensor MB: ours | theirs (default) | theirs (full slab) "
        "| ours ÷ theirs (default / full slab) | FLOPs counted: ours | theirs (default) "
        "| exp: ours ÷ theirs (default) | (mask + metadata) ÷ tensor: ours | theirs (default) |",
        "|" + "---|" * 15,
    ]
    for c in cells:
        key = _problem_key(c)
        default, full = _peer_cell(peer_cells, key, False), _peer_cell(peer_cells, key, True)
        if default is None:
            continue
        ours_exp = sum(v for k, v in c["math"].items() if k.startswith("exp"))
        ours_flops = c["flops"]["counted"]
        lines.append(
            f"| {c['head_dim']} | {c['seq']} | {c['mask']} | {c['q_heads']}/{c['kv_heads']} | {c['kernel']} "
            f"| {c['family']} {c['dtype']} | {_mb(c['bytes']['tensor'])} "
            f"| {_mb(default['bytes']['tensor'])} ({default['body']}, {default['dtype']}) "
            f"| {_mb(full['bytes']['tensor']) if full else 'n/a'} "
            f"| {_x(c['bytes']['tensor'] / default['bytes']['tensor'])} / "
            f"{_x(c['bytes']['tensor'] / full['bytes']['tensor']) if full else 'n/a'} "
            f"| {'scalar FMAs' if ours_flops is None else _mb(ours_flops) + ' M'} | {_mb(default['flops']['counted'])} M "
            f"| {_x(ours_exp / default['exp']) if default['exp'] else 'n/a'} "
            f"| {mask_metadata_ratio(c):.3f} | {mask_metadata_ratio(default):.3f} |"
        )
    for p in peer_cells:
        # Its delta kernel is the same in both variants.
        if p["kernel"] == "delta" and p["variant"] == "default":
            lines.append(
                f"| {p['head_dim']} | {p['seq']} | {p['mask']} | {p['q_heads']}/{p['kv_heads']} | delta "
                f"| an MLX reduction | | {_mb(p['bytes']['tensor'])} ({p['variant']}, {p['dtype']}) | | | | | "
                f"| | {mask_metadata_ratio(p):.3f} |"
            )
    return lines


PEER_DEFINITION = """\
mlx-train-perf's own launchers and kernel sources (`mlx_flash.bench.peer`:
nothing of it is in this package), run on the same seeded problems
through the same emulator and profiler, one grid column scaled to the
launch. *Default* is the tile its dispatch tables pick for the shape (its
API's kernel path), *full slab* its MMA body with a D-slab as wide as the
head dim (the same as the default at D = 128). Each of its kernels is one
dispatch here; its API cuts the same kernels into query-row ranges by a
rate it times on the GPU, which adds launches. Its kernels run float32 and
bfloat16, set beside ours in float32 and float16 (the same element size as
bfloat16, and the same demo source). Before a count is kept, the counted
column's outputs (query head 0; KV head 0 for dK/dV; delta's first row) are
checked against the float32 reference with demo's tolerances. Its backward
has a fourth kernel, delta = rowsum(dO · O); ours computes delta with an
MLX reduction outside the kernels. FLOPs: `simdgroup_multiply_accumulate`
operations × 1024 on both sides; practical's products are scalar FMAs."""


def _declared_demo_tiles() -> List[str]:
    lines = ["| D | forward B | dq B | dkdv B |", "|---|---|---|---|"]
    for dim, tiles in sorted(demo.TILES.items()):
        sizes = tiles.threadgroup_bytes(dim)
        lines.append(f"| {dim} | {sizes['forward']:,} | {sizes['dq']:,} | {sizes['dkdv']:,} |")
    return lines


DEFINITIONS = """\
**Counts.** The counted columns come from the emulator's profiler
(`mlx_flash.emulator.Profile`) while the kernel ran: device bytes each
buffer was read and written as the CPU build issues the accesses,
threadgroup memory, `simdgroup_multiply_accumulate` operations, SIMD
collectives, barriers and math-function calls, per threadgroup. They are
exact counts of what the kernels issue, not Metal timings, and say nothing
about caches, latency or occupancy. Each launch ran one column of its grid
(every threadgroup along x of the first query-head group or KV head) and
its totals are multiplied by the number of columns ("threadgroups counted:
n × columns"): a threadgroup's counts depend on its head only through
addresses (tested against whole launches in `tests/test_cost.py`), with one
exception: the practical forward rescales a row (a correction exp, and at
BK = 32 a group max) only when a score passes the row's maximum by more
than a slack, which depends on the scores. Its totals assume every column
rescales as often as the counted one, on the same seeded normal inputs.
Bounds, FLOPs marked "from visits", practical's source operations and the
register estimates are derived, not counted.

**Buffers.** *Tensor* bytes are q, k, v, dO, o, dq, dk, dv, lse and delta:
what the bounds bound. *Mask* bytes are the segment ids and the per-tile id
ranges. *Metadata* bytes are shapes, strides and `params`, uniform values
that every thread reads from the constant address space.

**Bounds** (`mlx_flash.bench.bounds`). Kept pairs: the (query, key) pairs the
mask keeps (causal L(L+1)/2 per head, packed documents of 512 the sum of
512·513/2 over documents). FLOPs: 2·D per kept pair for each product a
kernel's outputs need, forward S = QKᵀ and O = PV, dK/dV S, dP = dO Vᵀ,
dV = Pᵀ dO and dK = dSᵀ Q, dQ S, dP and dQ = dS K (S and dP are recomputed
by both backward kernels; one fused backward would take five products).
The counted FLOPs of demo are its `simdgroup_multiply_accumulate`
operations × 1024; practical's products are scalar FMAs the profiler does
not count, so its FLOPs follow from the tile pairs its loops visit (marked
"from visits"; for demo the same rule reproduces the counted operations
exactly). Device bytes, *minimum*: every tensor the kernel touches, once.
*Tiling* ("once per pass the tiling requires"): a kernel that owns query
tiles (forward, dQ) reads and writes its own rows once (q, o, lse; q, dO,
lse, delta, dq) and, for every threadgroup (a tile of query positions of the
query heads that share one KV head), the K and V rows of every key that some
pair of the tile keeps:
`bytes = own rows + Σ_query tiles keys_seen(tile) · (D + Dv) · size`.
dK/dV owns key tiles: k, v, dk, dv once, plus for every key tile and every
query head of its GQA group the q and dO rows and lse and delta of every
query that keeps some key of the tile:
`bytes = (k + v + dk + dv) + Σ_key tiles Σ_heads rows_seen(tile) · ((D + Dv) · size + 8)`.
The ratio to the tiling bound is the kernel's own excess (re-reads, keys
past the diagonal inside a key tile); the ratio to the minimum adds what
the tiling itself costs (K/V read once per query tile).

**Per pair.** Evaluated pairs: every pair of every tile pair a kernel visits
(diagonal tiles and tile padding included). exp / pair: exp and exp2 calls per
evaluated pair; lane-collectives: SIMD collectives × 32 lanes per evaluated
pair. Math calls count the lanes that made them: a call under a branch
that only some lanes of a SIMD group take (the backward's exp of kept
scores) counts those lanes, where a GPU issues it for the whole group."""

ALU_DEFINITION = """\
The practical kernels' non-MMA work per evaluated pair, in lane operations
(one lane executing one instruction): counted by the profiler, the math
calls (exp2 and the rows' log), the SIMD collectives (× 32 lanes) and the
max or add that follows each butterfly shuffle; from the source
(`mlx_flash.bench.cost.PRACTICAL_CODE_OPS`, hand-counted in
`practical_masked_score` and the kernels' score loops), the compares, ands,
selects, scale, exponent arguments and sums, and for the forward 5 more per
rescale (a row's new maximum: every exp2 beyond one per pair is one). The
scalar minimum (`SCALAR_MINIMUM`) is a kernel that gives each pair its own
thread, in float32, with the same contract: mask 2 (causal compare and the
select; packed 4, with the id compare and an and), scale 1, and forward the
kept flag, the running max, the exponent's argument (one FMA), exp and the
sum (8; packed 10); backward the argument, exp and dS = p·(dP − delta)
(7; packed 9). The total includes the per-row work the profiler counts
(the final sums' shuffles, the rows' log), the scalar minimum has none, and
O's rescale (Dv multiplies per row and tile in either) is in neither. The
rescale rate is that of seeded normal inputs: scores that pass the row's
maximum at every tile cost more (`tests/test_cost.py` counts such a row)."""


def markdown(results: dict) -> str:
    m, s, cells = results["machine"], results["settings"], results["cells"]
    lines = [f"# {s.get('title') or 'Kernel cost, counted by the CPU emulator'}", ""]
    lines += report.machine_lines(m)
    lines += [
        f"- **Run:** {m['started']}, {s['seconds']:.0f} s on the emulator · practical in float32, demo in float16 "
        "(bfloat16 runs the same source at the same element size) and float32",
        f"- **Command:** `{s['command']}`",
    ]
    if s.get("note"):
        lines.append(f"- **Conditions:** {s['note']}")
    lines += ["", "Counted by the CPU emulator: exact counts of what the kernels issue, not Metal timings.", ""]
    lines += [DEFINITIONS, ""]
    if s.get("interrupted"):
        lines += [f"**Interrupted** {s['interrupted']}: the tables hold the cases counted.", ""]
    if s.get("omitted"):
        lines += [f"**Not counted:** {s['omitted']}", ""]
    lines += ["## Targets", "", "| target | result | counted |", "|---|---|---|"]
    for t in results["targets"]:
        lines.append(f"| {t['name']} | **{t['status']}** | {t['detail']} |")
    lines += ["", "## Every kernel configuration", ""] + _cost_table(cells)
    peer = results.get("peer")
    if peer:
        lines += ["", f"## Against mlx-train-perf {peer['version']}", "", PEER_DEFINITION, ""]
        lines += _peer_table(cells, peer["cells"])
        for failure in peer.get("failed") or []:
            lines += ["", f"**Not counted, wrong against the reference:** {failure}"]
    if any(c["family"] == "practical" for c in cells):
        lines += ["", "## Practical: non-MMA ALU work per evaluated pair", "", ALU_DEFINITION, ""]
        lines += _alu_table(cells)
    lines += ["", "Demo tiles' threadgroup memory as `mlx_flash.demo.TileSet` declares it, every head dim "
              "(the counted peaks above agree where counted):", ""] + _declared_demo_tiles()
    before = results.get("before")
    if before:
        commit = before["source"]["commit"]
        now = (m.get("source") or {}).get("commit", "now")
        lines += [
            "", f"## Before and after: the kernels at {commit} and at {now} (causal)", "",
            f"{commit}: the {before['source']['what']}, "
            f"counted with the same profiler and rules by `bench/emulator-cost/before.py` "
            f"({before.get('seconds', 0):.0f} s); packed documents did not exist then.",
            "",
        ]
        lines += _before_after(before["cells"], cells, commit, now)
    lines += ["", "Every counter of every cell, per buffer: `results.json`.", ""]
    return "\n".join(lines)


def write_all(results: dict, out_dir: str) -> Dict[str, str]:
    """``report.md`` and ``results.json`` under ``out_dir``."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {"json": os.path.join(out_dir, "results.json"), "markdown": os.path.join(out_dir, "report.md")}
    report.write_json(results, paths["json"])
    with open(paths["markdown"], "w") as f:
        f.write(markdown(results))
    return paths
