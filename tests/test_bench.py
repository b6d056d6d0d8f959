"""The benchmark harness on tiny sizes: output schema, correctness gating,
targets, memory skips and the command line. No timing is asserted."""

import csv
import json
import math
import os
import sys

import mlx.core as mx
import pytest

import mlx_flash
from mlx_flash.bench import cli, harness, targets
from mlx_flash.bench import masks as bench_masks

TINY = ["--quick", "--batch", "1", "--seq", "16,24", "--head-dim", "8", "--heads", "2", "--repeats", "2"]

CELL_FIELDS = {
    "mode": str, "batch": int, "seq": int, "q_len": int, "heads": int, "kv_heads": int,
    "head_dim": int, "mask": str, "dtype": str, "variant": str, "implementation": str,
    "backend": str, "reason": str, "status": str, "detail": str, "errors": dict,
    "times_s": list, "estimated_bytes": int,
}
OPTIONAL_NUMBERS = (
    "median_s", "p95_s", "min_s", "tokens_per_s", "peak_memory_bytes", "floor_bytes", "peak_over_floor", "resident_bytes",
    "speedup_vs_manual", "speedup_vs_mlx", "tolerance",
)


@pytest.fixture
def registry(monkeypatch):
    """A private copy of the variant registry, so injected variants do not leak."""
    monkeypatch.setattr(harness, "VARIANTS", dict(harness.VARIANTS))
    return harness.VARIANTS


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("quick")
    code = cli.main(TINY + ["--out", str(out)])
    with open(out / "results.json") as f:
        results = json.load(f)
    return code, out, results


def test_quick_writes_report_json_and_csv(quick_run):
    code, out, results = quick_run
    assert code == 0
    for name in ("report.md", "results.json", "results.csv"):
        assert (out / name).stat().st_size > 0
    # 2 lengths x 2 modes x 5 variants.
    assert len(results["cells"]) == 20
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(results["cells"])
    for row, cell in zip(rows, results["cells"]):
        assert row["variant"] == cell["variant"]
        assert [float(t) for t in row["times_s"].split()] == pytest.approx(cell["times_s"], rel=1e-5)


def test_json_schema(quick_run):
    _, _, results = quick_run
    assert results["schema"] == "mlx-flash-bench/1"
    machine = results["machine"]
    for key in ("chip", "os", "mlx_version", "backend", "cpu_cores"):
        assert machine[key]
    assert machine["mlx_version"] == mx.__version__
    settings = results["settings"]
    assert settings["repeats"] == 2
    assert settings["dtypes"] in (["float32"], ["float16"])
    assert results["targets"] == []
    for cell in results["cells"]:
        for key, kind in CELL_FIELDS.items():
            assert isinstance(cell[key], kind), key
        for key in OPTIONAL_NUMBERS:
            assert cell[key] is None or isinstance(cell[key], (int, float)), key
        assert cell["status"] == "ok", cell["detail"]
        assert cell["q_len"] == cell["seq"]
        times = cell["times_s"]
        assert len(times) == 2
        assert min(times) == cell["min_s"] <= cell["median_s"] <= cell["p95_s"] <= max(times)
        assert cell["tokens_per_s"] == pytest.approx(cell["batch"] * cell["seq"] / cell["median_s"])
        assert cell["peak_memory_bytes"] >= cell["resident_bytes"] > 0
        assert set(cell["errors"]) == ({"out", "dq", "dk", "dv"} if cell["mode"] == "fwdbwd" else {"out"})
        assert max(cell["errors"].values()) <= cell["tolerance"]


def test_report_names_what_ran(quick_run):
    """Every variant's row says what ``explain`` says runs for it."""
    _, out, results = quick_run
    text = (out / "report.md").read_text()
    assert results["machine"]["chip"] in text
    assert f"MLX {mx.__version__}" in text
    q = mx.zeros((1, 2, 16, 8))
    for name in ("manual", "mlx", "blockwise", "practical", "demo"):
        plan = mlx_flash.explain(q, q, q, mask="causal", variant=name)
        assert f"| {name} | {plan.implementation} | {plan.backend} | {plan.reason} |" in text
        cells = [c for c in results["cells"] if c["variant"] == name]
        assert {c["implementation"] for c in cells} == {plan.implementation}
        if name in ("practical", "demo") and plan.implementation == "blockwise":
            assert f"{name} → blockwise" in text
            assert all(c["shared_with"] == "blockwise" for c in cells)


def test_speedups_relate_medians(quick_run):
    _, _, results = quick_run
    cells = results["cells"]
    for cell in cells:
        same = [c for c in cells if c["mode"] == cell["mode"] and c["seq"] == cell["seq"]]
        manual = next(c for c in same if c["variant"] == "manual")
        mlx = next(c for c in same if c["variant"] == "mlx")
        assert cell["speedup_vs_manual"] == pytest.approx(manual["median_s"] / cell["median_s"])
        assert cell["speedup_vs_mlx"] == pytest.approx(mlx["median_s"] / cell["median_s"])


def _config(mode="fwdbwd", seq=16):
    return harness.Config(mode, 1, seq, 2, 1, 8, "causal", "float32")


def test_wrong_output_is_failed_with_no_speed(registry):
    def wrong(q, k, v, scale, mask):
        return mlx_flash.scaled_dot_product_attention(q, k, v, scale=scale * 1.5, mask=mask, variant="manual")

    harness.register_variant("wrong", wrong)
    cells = harness.run([_config("fwd")], ["manual", "wrong"], warmup=1, repeats=2)
    good, bad = cells
    assert good.status == "ok"
    assert bad.status == "FAILED"
    assert "out" in bad.detail
    assert bad.errors["out"] > bad.tolerance
    for field in ("median_s", "p95_s", "min_s", "tokens_per_s", "peak_memory_bytes", "speedup_vs_manual"):
        assert getattr(bad, field) is None
    assert bad.times_s == []


def test_wrong_gradient_is_failed_in_fwdbwd_only(registry):
    """A forward that is right with a backward that is not: fwd passes, fwdbwd fails."""

    @mx.custom_function
    def attend(q, k, v):
        return mlx_flash.scaled_dot_product_attention(q, k, v, scale=8**-0.5, mask="causal", variant="manual")

    @attend.vjp
    def attend_vjp(primals, cotangent, output):
        _, grads = mx.vjp(
            lambda q, k, v: mlx_flash.scaled_dot_product_attention(
                q, k, v, scale=8**-0.5, mask="causal", variant="manual"
            ),
            list(primals),
            [cotangent],
        )
        return grads[0], grads[1] * 2, grads[2]

    harness.register_variant("bad_dk", lambda q, k, v, scale, mask: attend(q, k, v))
    fwd, fwdbwd = harness.run([_config("fwd"), _config("fwdbwd")], ["bad_dk"], warmup=1, repeats=1)
    assert fwd.status == "ok"
    assert fwdbwd.status == "FAILED"
    assert fwdbwd.errors["dk"] > fwdbwd.tolerance
    assert fwdbwd.errors["dq"] <= fwdbwd.tolerance and fwdbwd.errors["dv"] <= fwdbwd.tolerance
    assert fwdbwd.median_s is None


def test_nan_output_fails_and_crash_is_error(registry):
    harness.register_variant("nan", lambda q, k, v, scale, mask: mx.full(q.shape, math.nan))

    def crash(q, k, v, scale, mask):
        raise RuntimeError("kernel exploded")

    harness.register_variant("crash", crash)
    nan, boom = harness.run([_config("fwd")], ["nan", "crash"], warmup=1, repeats=1)
    assert nan.status == "FAILED" and nan.median_s is None
    assert boom.status == "error" and "kernel exploded" in boom.detail and boom.median_s is None
    # JSON has no NaN or infinity: the unmeasurable error becomes null.
    row = nan.to_dict()
    assert row["errors"]["out"] is None
    json.dumps(row, allow_nan=False)


def test_wrong_variant_makes_the_command_fail(registry, tmp_path):
    harness.register_variant(
        "wrong", lambda q, k, v, scale, mask: mlx_flash.scaled_dot_product_attention(
            q, k, v, scale=scale, mask=None, variant="manual")
    )
    code = cli.main(TINY + ["--seq", "16", "--mode", "fwd", "--variants", "manual,wrong", "--out", str(tmp_path)])
    assert code == 1
    results = json.loads((tmp_path / "results.json").read_text())
    wrong = [c for c in results["cells"] if c["variant"] == "wrong"]
    assert [c["status"] for c in wrong] == ["FAILED"]
    assert wrong[0]["median_s"] is None and wrong[0]["times_s"] == []
    assert "**FAILED** wrong" in (tmp_path / "report.md").read_text()


def test_cells_that_cannot_fit_are_skipped():
    cells = harness.run([_config("fwdbwd")], ["manual", "blockwise"], max_memory_bytes=1024)
    for cell in cells:
        assert cell.status == "skipped"
        assert "GiB" in cell.detail and cell.median_s is None and cell.times_s == []


def test_unfused_estimate_grows_quadratically():
    short, long = _config("fwdbwd", 1024), _config("fwdbwd", 4096)
    manual = harness.estimate_bytes(long, "manual") / harness.estimate_bytes(short, "manual")
    blockwise = harness.estimate_bytes(long, "blockwise") / harness.estimate_bytes(short, "blockwise")
    assert manual > 12
    assert blockwise < 6


def test_decode_cells_use_one_query():
    cells = harness.run([_config("decode", 32)], ["manual", "mlx"], warmup=1, repeats=2)
    for cell in cells:
        assert cell.status == "ok", cell.detail
        assert cell.config.q_len == 1
        assert cell.tokens_per_s == pytest.approx(1 / cell.median_s)


def test_check_covers_every_slice_of_small_configs():
    small = harness.Config("fwdbwd", 2, 64, 4, 2, 8, "causal", "float32")
    assert harness.check_slices(small) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    big = harness.Config("fwdbwd", 2, 4096, 8, 8, 64, "causal", "float32")
    assert harness.check_slices(big) == [(0, 0), (1, 7)]


def test_oracle_matches_a_direct_reference_computation():
    config = harness.Config("fwdbwd", 2, 12, 4, 2, 8, "none", "float32")
    q, k, v, d_out = harness.make_inputs(config)
    truth = harness.oracle(config, q, k, v, d_out)
    (out,), grads = mx.vjp(
        lambda a, b, c: mlx_flash.reference.attention(a, b, c, 8**-0.5, None), [q, k, v], [d_out]
    )
    errors = harness.compare({"out": out, "dq": grads[0], "dk": grads[1], "dv": grads[2]}, truth, 2)
    assert max(errors.values()) < 1e-5
    shifted = harness.compare({"out": out + 1, "dq": grads[0], "dk": grads[1], "dv": grads[2]}, truth, 2)
    assert shifted["out"] > 0.1


# ----- targets ---------------------------------------------------------------


def _cell(variant, seq, *, status="ok", median=None, peak=None):
    cell = harness.Cell(harness.Config("fwdbwd", 1, seq, 8, 8, 64, "causal", "float32"), variant)
    cell.implementation, cell.backend, cell.status = variant, "mlx ops", status
    cell.median_s, cell.peak_memory_bytes = median, peak
    return cell.to_dict()


CPU = {"backend": "cpu", "os_name": "linux", "chip": "AMD EPYC"}


def _target(**fields):
    target = {"name": "t", "where": {"mode": "fwdbwd", "mask": "causal"}, **fields}
    targets.validate(target)
    return target


MEMORY = dict(metric="peak_memory", numerator={"variant": "mlx"}, denominator={"variant": "blockwise"},
              at_least=8)


def test_target_ratio_pass_and_fail():
    target = _target(**MEMORY)
    passing = [_cell("mlx", 4096, peak=800), _cell("blockwise", 4096, peak=100)]
    failing = [_cell("mlx", 4096, peak=800), _cell("blockwise", 4096, peak=101)]
    result = targets.evaluate_one(target, passing, CPU)
    assert result["status"] == "PASS"
    assert result["pairs"][0]["ratio"] == pytest.approx(8.0)
    assert targets.evaluate_one(target, failing, CPU)["status"] == "FAIL"


def test_target_growth_between_lengths():
    target = _target(metric="peak_memory", numerator={"seq": 4096}, denominator={"seq": 2048}, at_most=2.5,
                     where={"variant": "blockwise"})
    cells = [_cell("blockwise", 2048, peak=100), _cell("blockwise", 4096, peak=250), _cell("mlx", 4096, peak=9)]
    assert targets.evaluate_one(target, cells, CPU)["status"] == "PASS"
    cells[1]["peak_memory_bytes"] = 251
    assert targets.evaluate_one(target, cells, CPU)["status"] == "FAIL"


def test_target_every_pair_must_hold():
    target = _target(metric="median_time", numerator={"variant": "blockwise"}, denominator={"variant": "mlx"},
                     at_most=1.0, where={"seq": {"min": 1024}})
    cells = [
        _cell("blockwise", 512, median=9.0), _cell("mlx", 512, median=1.0),  # below min: ignored
        _cell("blockwise", 1024, median=1.0), _cell("mlx", 1024, median=2.0),
        _cell("blockwise", 2048, median=4.0), _cell("mlx", 2048, median=8.0),
    ]
    result = targets.evaluate_one(target, cells, CPU)
    assert result["status"] == "PASS" and len(result["pairs"]) == 2
    cells[4]["median_s"] = 8.5
    result = targets.evaluate_one(target, cells, CPU)
    assert result["status"] == "FAIL" and "1 of 2" in result["detail"]


def test_target_on_other_hardware_is_skipped_not_failed():
    target = _target(**MEMORY, when={"backend": "metal", "chip": "Apple M"})
    cells = [_cell("mlx", 4096, peak=1), _cell("blockwise", 4096, peak=100)]
    result = targets.evaluate_one(target, cells, CPU)
    assert result["status"] == "SKIP" and "not applicable" in result["detail"]
    apple = {"backend": "metal", "os_name": "darwin", "chip": "Apple M3 Max"}
    assert targets.evaluate_one(target, cells, apple)["status"] == "FAIL"


def test_target_without_measurements_says_so():
    target = _target(**MEMORY)
    assert targets.evaluate_one(target, [], CPU)["status"] == "NOT MEASURED"
    skipped = [_cell("mlx", 4096, status="skipped"), _cell("blockwise", 4096, peak=100)]
    result = targets.evaluate_one(target, skipped, CPU)
    assert result["status"] == "NOT MEASURED" and "skipped" in result["detail"]


def test_target_with_a_wrong_cell_fails():
    target = _target(**MEMORY)
    cells = [_cell("mlx", 4096, peak=800), _cell("blockwise", 4096, status="FAILED")]
    result = targets.evaluate_one(target, cells, CPU)
    assert result["status"] == "FAIL" and "FAILED" in result["detail"]


def test_bad_target_is_rejected():
    with pytest.raises(ValueError, match="metric"):
        targets.validate({"name": "x", "metric": "speed", "at_least": 1})
    with pytest.raises(ValueError, match="unknown axes"):
        targets.validate({"name": "x", "metric": "peak_memory", "at_least": 1, "where": {"length": 4}})
    with pytest.raises(ValueError, match="at_least"):
        targets.validate({"name": "x", "metric": "peak_memory"})


def test_shipped_targets_declare_the_cpu_memory_targets_and_metal_examples(tmp_path, monkeypatch):
    declared = targets.load(targets.SHIPPED)
    cpu = [t for t in declared if t["when"]["backend"] == "cpu"]
    assert len(cpu) == 9
    assert {t["metric"] for t in cpu} == {"peak_memory", "median_time", "peak_over_floor"}
    structured = {t["where"].get("mask") or t["numerator"]["mask"] for t in cpu if t["name"].split()[0] in ("packed", "windowed", "sinks")}
    assert structured == {"causal+docs512", "causal+window1024", "causal+sinks"}
    metal = [t for t in declared if t["when"]["backend"] == "metal"]
    assert metal and len(cpu) + len(metal) == len(declared)
    # Found from anywhere: the old checkout path falls back to the shipped file.
    monkeypatch.chdir(tmp_path)
    assert targets.load("bench/targets.yaml") == declared
    with pytest.raises(ValueError, match="^--targets: cannot read elsewhere/targets.yaml"):
        targets.load("elsewhere/targets.yaml")


def test_reports_speak_of_what_they_measure():
    # Targets and the reports rendered from them name the measurement, not how it was planned.
    import re

    root = os.path.join(os.path.dirname(__file__), "..")
    texts = [open(targets.SHIPPED).read()]
    for name in ("linux-cpu-memory", "linux-cpu-matrix", "linux-cpu-decode"):
        for file in ("report.md", "results.json"):
            texts.append(open(os.path.join(root, "bench", name, file)).read())
    texts.append(open(os.path.join(root, "bench", "README.md")).read())
    for text in texts:
        assert not re.search(r"\bissue[ -]?\d", text, re.IGNORECASE)


def _write_targets(path, bound):
    path.write_text(
        "targets:\n"
        "  - name: manual within bound of mlx\n"
        "    where: {mode: fwd}\n"
        "    metric: median_time\n"
        "    numerator: {variant: mlx}\n"
        "    denominator: {variant: manual}\n"
        f"    {bound}\n"
    )


def test_command_exit_status_follows_targets(tmp_path):
    args = TINY + ["--seq", "16", "--mode", "fwd", "--variants", "manual,mlx"]
    impossible = tmp_path / "impossible.yaml"
    _write_targets(impossible, "at_least: 1000000")
    assert cli.main(args + ["--targets", str(impossible), "--out", str(tmp_path / "a")]) == 1
    report = (tmp_path / "a" / "report.md").read_text()
    assert "**FAIL**" in report
    easy = tmp_path / "easy.yaml"
    _write_targets(easy, "at_most: 1000000")
    assert cli.main(args + ["--targets", str(easy), "--out", str(tmp_path / "b")]) == 0
    results = json.loads((tmp_path / "b" / "results.json").read_text())
    assert [t["status"] for t in results["targets"]] == ["PASS"]


def test_memory_preset_measures_fwdbwd_memory_of_manual_mlx_and_blockwise():
    chosen = cli.settings(cli.build_parser().parse_args(["--memory"]))
    assert chosen["seq"] == [512, 1024, 2048, 4096]
    assert chosen["variants"] == ["manual", "mlx", "blockwise"]
    assert (chosen["batch"], chosen["heads"], chosen["head_dim"]) == ([1], [8], [64])
    assert chosen["mode"] == "fwdbwd" and chosen["mask"] == ["causal"] and chosen["dtype"] == ["float32"]
    configs = cli.configs(chosen)
    assert len(configs) == 4 and all(c.kv_heads == 8 for c in configs)


def test_axis_flags_override_the_preset():
    args = cli.build_parser().parse_args(["--quick", "--seq", "32", "64", "--kv-heads", "2", "--decode"])
    chosen = cli.settings(args)
    assert chosen["seq"] == [32, 64] and chosen["mode"] == "decode"
    assert {(c.heads, c.kv_heads, c.q_len) for c in cli.configs(chosen)} == {(8, 2, 1)}


def test_without_matplotlib_there_are_no_plots(quick_run, monkeypatch, tmp_path):
    import sys

    from mlx_flash.bench import report

    _, _, results = quick_run
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib` fail
    paths = report.write_all(dict(results, settings=dict(results["settings"])), str(tmp_path))
    assert not any(p.endswith(".png") for p in paths.values())
    assert sorted(os.listdir(tmp_path)) == ["report.md", "results.csv", "results.json"]
    assert "## Plots" not in (tmp_path / "report.md").read_text()


def test_render_rebuilds_the_report_from_json(quick_run, tmp_path):
    _, out, results = quick_run
    original = (out / "report.md").read_text()
    copy = tmp_path / "results.json"
    copy.write_text(json.dumps(results))
    assert cli.main(["--render", str(copy)]) == 0
    assert (tmp_path / "report.md").read_text() == original
    assert (tmp_path / "results.csv").read_text() == (out / "results.csv").read_text()


def test_report_names_the_source_state(quick_run):
    from mlx_flash.bench import report

    _, _, results = quick_run
    machine = dict(results["machine"], source={"commit": "abc1234", "uncommitted": ["mlx_flash/blockwise.py"]})
    text = report.markdown(dict(results, machine=machine))
    assert "at commit abc1234 with uncommitted changes to mlx_flash/blockwise.py" in text
    clean = dict(results["machine"], source={"commit": "abc1234", "uncommitted": []})
    text = report.markdown(dict(results, machine=clean))
    assert "at commit abc1234" in text and "uncommitted" not in text


# ---- structured masks: packed documents, windows, sinks ----------------------


def test_packed_run_checks_every_cell_and_runs_the_baseline_with_blockwise_only(tmp_path):
    code = cli.main(
        ["--packed", "--seq", "128", "--documents", "32", "--heads", "2", "--repeats", "1",
         "--variants", "manual,mlx,blockwise", "--out", str(tmp_path)]
    )
    assert code == 0
    cells = json.loads((tmp_path / "results.json").read_text())["cells"]
    packed = [c for c in cells if c["mask"] == "causal+docs32"]
    baseline = [c for c in cells if c["mask"] == "causal"]
    assert sorted(c["variant"] for c in packed) == ["blockwise", "manual", "mlx"]
    assert [c["variant"] for c in baseline] == ["blockwise"]
    for cell in cells:
        assert cell["status"] == "ok" and cell["mode"] == "fwdbwd"
        assert cell["floor_bytes"] == 8 * 2 * 128 * 64 * 4
        assert cell["peak_over_floor"] == pytest.approx(cell["peak_memory_bytes"] / cell["floor_bytes"])


def test_a_variant_that_ignores_the_documents_fails_the_check(registry):
    def leaky(q, k, v, scale, mask, **structure):
        return mlx_flash.scaled_dot_product_attention(q, k, v, scale=scale, mask=mask, variant="manual")

    harness.register_variant("leaky", leaky)
    config = harness.Config("fwd", 1, 64, 2, 1, 8, "causal+docs16", "float32")
    right, wrong = harness.run([config], ["blockwise", "leaky"], warmup=1, repeats=1)
    assert right.status == "ok"
    assert wrong.status == "FAILED" and wrong.median_s is None


@pytest.mark.parametrize(
    "argv, masks",
    [
        (["--window", "16"], ["causal+window16", "causal"]),
        (["--sinks"], ["causal+sinks", "causal"]),
        (["--packed", "--window", "64", "--sinks"], ["causal+docs512+window64+sinks", "causal"]),
        (["--documents", "1-300"], ["causal+docs1-300", "causal"]),
        (["--window", "8", "--mask", "causal"], ["causal+window8"]),
    ],
)
def test_structure_flags_build_the_mask_axis(argv, masks):
    chosen = cli.settings(cli.build_parser().parse_args(argv))
    assert chosen["mask"] == masks
    assert chosen["preset"] == "structured"
    variants_for = cli._variants_for(chosen)
    config = harness.Config("fwdbwd", 1, 64, 2, 2, 8, "causal", "float32")
    expected = ["blockwise"] if len(masks) == 2 else chosen["variants"]
    assert list(variants_for(config)) == expected


@pytest.mark.parametrize(
    "name, message",
    [("causal+docs0", "1 <= A <= B"), ("none+window4", "needs 'causal'"), ("causal+dense", "unknown part"),
     ("upper", "start with .none. or .causal.")],
)
def test_bad_mask_names_are_one_line_errors(name, message):
    with pytest.raises(ValueError, match=message):
        bench_masks.check(name)


def test_target_on_one_cells_own_metric():
    target = {"name": "floor", "where": {"mode": "fwdbwd", "mask": "causal", "variant": "blockwise"},
              "metric": "peak_over_floor", "at_most": 2}
    targets.validate(target)
    cell = _cell("blockwise", 4096, peak=100)
    cell["peak_over_floor"] = 1.5
    result = targets.evaluate_one(target, [cell], CPU)
    assert result["status"] == "PASS" and "ratio 1.50" in result["detail"]
    cell["peak_over_floor"] = 2.5
    assert targets.evaluate_one(target, [cell], CPU)["status"] == "FAIL"


# The command line: bad input is one line and exit status 2, nothing written.


@pytest.mark.parametrize(
    "args, message",
    [
        (["--seq", "0"], "--seq: must be at least 1, got 0"),
        (["--batch", "2,-1"], "--batch: must be at least 1, got -1"),
        (["--head-dim", "0"], "--head-dim: must be at least 1, got 0"),
        (["--repeats", "0"], "--repeats: must be at least 1, got 0"),
        (["--warmup", "0"], "--warmup: must be at least 1 (the first run is the correctness check)"),
        (["--dtype", "float8"], "--dtype: unknown dtype 'float8'"),
        (["--variants", "manual,fastest"], "--variants: unknown variant 'fastest'"),
        (["--mask", "sliding"], "--mask: unknown mask 'sliding'"),
        (["--max-memory-gb", "0"], "--max-memory-gb: must be above 0"),
        (["--targets", "nowhere.yaml"], "--targets: cannot read nowhere.yaml"),
    ],
)
def test_bad_arguments_are_one_line(args, message, tmp_path, capsys):
    assert cli.main(TINY + args + ["--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mlx_flash.bench: error: ") and message in err[0], err
    assert not (tmp_path / "out").exists()


def test_out_that_is_a_file_or_holds_a_report(quick_run, tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("keep\n")
    assert cli.main(TINY + ["--out", str(target)]) == 2
    assert f"--out: {target} is a file, not a folder" in capsys.readouterr().err
    assert target.read_text() == "keep\n"
    # An earlier report is not replaced unless asked.
    _, out, _ = quick_run
    before = (out / "results.json").read_text()
    assert cli.main(TINY + ["--out", str(out)]) == 2
    assert "already holds a benchmark report: pass --overwrite" in capsys.readouterr().err
    assert (out / "results.json").read_text() == before
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / "results.json").write_text(before)
    assert cli.main(["--render", str(out / "results.json"), "--out", str(copy)]) == 2
    assert cli.main(["--render", str(out / "results.json"), "--out", str(copy), "--overwrite"]) == 0


def test_hours_long_run_asks_first(monkeypatch, capsys, tmp_path):
    # 5 GFLOP/s, about this machine's: the full matrix is hours.
    monkeypatch.setattr(cli, "matmul_rate", lambda: 5e9)
    monkeypatch.chdir(tmp_path)
    assert cli.main([]) == 2
    err = capsys.readouterr().err
    assert "this benchmark is 630 cells, at least about" in err and "pass --yes to run it anyway" in err
    assert not (tmp_path / "runs").exists()

    class Terminal:
        def isatty(self):
            return True

    monkeypatch.setattr(sys, "stdin", Terminal())
    monkeypatch.setattr("builtins.input", lambda prompt: "n")
    assert cli.main(["--matrix"]) == 2
    err = capsys.readouterr().err
    assert "mlx_flash.bench: warning: this benchmark is 630 cells" in err and "not started" in err
    # A small matrix starts without asking.
    chosen = cli.settings(cli.build_parser().parse_args(TINY))
    assert cli.estimated_seconds(cli.configs(chosen), chosen, 5e9) < 1


def test_shipped_targets_with_no_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = TINY + ["--seq", "16", "--mode", "fwd", "--variants", "manual,mlx", "--targets", "--out", str(tmp_path / "o")]
    assert cli.main(args) == 0
    results = json.loads((tmp_path / "o" / "results.json").read_text())
    assert [t["name"] for t in results["targets"]] == [t["name"] for t in targets.load(targets.SHIPPED)]
