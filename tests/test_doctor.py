"""The doctor, the verdict cache and how ``auto`` decides from it, on the emulator.

Every test keeps its verdicts in its own ``MLX_FLASH_CACHE`` and runs the
kernels on the emulator (``--emulator`` on a Mac, where Metal is the default). Broken kernels
are made on purpose: a forward launcher whose output is off (a wrong
result), a kernel source that does not compile (an error with the generated
source lines). Kernel units are checked at float16 / float32 and head dim
64 on a few mask kinds, so the emulator builds the sources the kernel tests
build too.
"""

import dataclasses
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import pytest

import mlx_flash
from conftest import assert_close
from kernel_checks import random_inputs
from mlx_flash import emulator, families, kernels, validation, verdicts
from mlx_flash.bench import harness

checkup = importlib.import_module("mlx_flash.doctor.checkup")
cli = importlib.import_module("mlx_flash.doctor.cli")
grid = importlib.import_module("mlx_flash.doctor.grid")
report = importlib.import_module("mlx_flash.doctor.report")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A fresh verdict cache; first-use validation at its emulator default (off)."""
    monkeypatch.setenv("MLX_FLASH_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MLX_FLASH_VALIDATE", raising=False)
    return tmp_path / "cache"


@pytest.fixture
def wrong_demo(monkeypatch):
    """demo's forward kernel returns an output 5% and 0.2 off (wrong also at the benchmark's looser tolerance)."""
    right = families.DEMO

    def forward(call):
        out, lse = right.forward(call)
        return out * 1.05 + 0.2, lse

    monkeypatch.setitem(families.REGISTRY, "demo", dataclasses.replace(right, forward=forward))


BROKEN_LINE = "this_line_is_not_metal;"


@pytest.fixture
def broken_practical_dq(monkeypatch):
    """practical's dQ kernel source does not compile."""
    source = kernels.source

    def broken(filename):
        text = source(filename)
        return text + f"\n    {BROKEN_LINE}\n" if filename == "practical_backward_dq.metal" else text

    kernels.build.cache_clear()
    monkeypatch.setattr(kernels, "source", broken)
    yield
    kernels.build.cache_clear()


def _verdict_file() -> dict:
    return json.loads(verdicts.path_for(verdicts.machine_key("emulator")).read_text())


def _doctor(families, dtype, kinds):
    """The doctor on the emulator for ``families`` at ``dtype``, head dim 64, ``kinds``."""
    return mlx_flash.doctor(emulator=True, families=families, dtypes=[dtype], head_dims=[64], masks=kinds)


def _packed(length=40, heads=4, dtype=mx.float16, dim=64):
    q, k, v, dout = random_inputs(1, heads, 2, length, length, dim, dim, dtype, seed=3)
    ids = mx.array([[0] * (length // 2) + [1] * (length - length // 2)])
    return q, k, v, dout, ids


# ---- the command ---------------------------------------------------------------


def test_command_writes_verdicts_and_a_report(cache, tmp_path):
    out = tmp_path / "doctor.md"
    command = [sys.executable, "-m", "mlx_flash.doctor", "--emulator", "--quick", "--family", "practical"]
    command += ["--dtype", "float16", "--head-dim", "64", "--out", str(out)]
    env = {**os.environ, "MLX_FLASH_CACHE": str(cache)}
    result = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    text = result.stdout
    assert out.read_text() == text
    assert text.startswith("# mlx-flash doctor report")
    assert "kernels ran on the CPU emulator" in text and "no time below is a Metal time" in text
    assert "Timing skipped" in text and "ms |" not in text
    assert "7 of 7 kernel units passed" in text
    kinds = " | ".join(verdicts.MASK_KINDS)
    assert f"| family | dtype | D x Dv | {kinds} |" in text
    assert "| practical | float16 | 64x64 | " + " | ".join(["pass"] * 7) + " |" in text
    assert "[7/7]" in result.stderr  # the progress, on stderr

    saved = _verdict_file()
    assert saved["key"] == verdicts.machine_key("emulator")
    assert saved["key"]["kernels"] == verdicts.kernel_source_hash("emulator")
    assert sorted(saved["kernels"]) == sorted(f"practical/float16/64x64/{kind}" for kind in verdicts.MASK_KINDS)
    assert {entry["status"] for entry in saved["kernels"].values()} == {"passed"}
    assert {entry["by"] for entry in saved["kernels"].values()} == {"doctor"}
    assert not list(cache.glob("verdicts/*.tmp"))


def test_command_rejects_bad_input_in_one_line(cache, tmp_path, capsys):
    folder = tmp_path / "reports"
    folder.mkdir()
    for argv, wanted in [
        (["--model", str(tmp_path / "missing")], "--model: no model folder"),
        (["--head-dim", "64y"], "--head-dim: expected D or DxDv"),
        (["--out", str(folder)], "is a folder"),
        (["--emulator", "--head-dim", "256", "--family", "demo"], "nothing to validate"),
    ]:
        assert cli.main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert err.startswith("mlx_flash.doctor: error: ") and wanted in err and "\n" not in err, err
    with pytest.raises(SystemExit) as stop:
        cli.main(["--quick", "--full"])
    assert stop.value.code == 2
    assert not cache.exists()  # nothing was validated or written


def test_interrupted_run_keeps_what_finished(cache, monkeypatch):
    calls = []
    check = validation.check

    def stop_second(unit, shape):
        calls.append(unit)
        if len(calls) == 2:
            # Were the process to end here (a GPU fault), the verdict would say
            # so and the kernel would not be used again.
            entry = _verdict_file()["kernels"][unit.key]
            assert (entry["status"], entry["detail"]) == ("failed", validation.ENDED)
            raise KeyboardInterrupt
        return check(unit, shape)

    monkeypatch.setattr(validation, "check", stop_second)
    findings = _doctor(["practical"], "float16", ["causal", "window"])
    assert findings.interrupted and not findings.ok and len(calls) == 2
    assert [r.unit.kind for r in findings.results] == ["causal"]
    assert list(_verdict_file()["kernels"]) == ["practical/float16/64x64/causal"]
    assert "INTERRUPTED" in str(findings)


# ---- broken kernels --------------------------------------------------------------


def test_wrong_result_fails_and_auto_falls_back(cache, wrong_demo):
    findings = _doctor(["demo"], "float16", ["causal", "segments"])
    assert not findings.ok
    assert [(r.unit.kind, r.status, r.kernel) for r in findings.results] == [
        ("causal", "failed", "forward"),
        ("segments", "failed", "forward"),
    ]
    assert all(r.detail.startswith("wrong output: max error") for r in findings.results)
    text = str(findings)
    assert "0 of 2 kernel units passed" in text and "**FAIL** (forward)" in text
    assert _verdict_file()["kernels"]["demo/float16/64x64/causal"]["status"] == "failed"

    q, k, v, dout, ids = _packed()
    with emulator.metal():
        plan = mlx_flash.explain(q, k, v, mask="causal", segment_ids=ids)
        assert plan.implementation == "practical"
        assert "demo failed validation on this machine (float16 64x64 causal: forward kernel: wrong output" in plan.reason
        out = mlx_flash.scaled_dot_product_attention(q, k, v, scale=0.125, mask="causal", segment_ids=ids)
    # The wrong kernel did not run: the result is the reference's.
    want = mlx_flash.scaled_dot_product_attention(q, k, v, scale=0.125, mask="causal", segment_ids=ids, variant="manual")
    assert_close(out, want, (2e-3, 1e-2), "auto's output")
    # An explicit request still runs what it names.
    with emulator.metal():
        assert mlx_flash.explain(q, k, v, mask="causal", segment_ids=ids, variant="demo").implementation == "demo"


def test_compile_error_is_reported_with_its_source_and_auto_falls_back(cache, broken_practical_dq):
    findings = _doctor(["practical"], "float32", ["causal"])
    (result,) = findings.results
    assert (result.status, result.kernel) == ("failed", "dq")
    assert result.detail.startswith("CompileError: ")
    assert BROKEN_LINE in result.detail  # the generated source line the compiler named
    text = str(findings)
    assert "practical float32 64x64 causal: dq kernel: CompileError" in text
    assert BROKEN_LINE in text.split("### Failures")[1]

    x = mx.zeros((1, 2, 16, 64), mx.float32)
    # demo comes first for float32 too; failed here as well, auto falls past
    # both kernel families to blockwise, saying why.
    failed = {"status": "failed", "kernel": "forward", "detail": "wrong output: injected", "by": "test"}
    verdicts.record("emulator", kernels={verdicts.unit_key("demo", "float32", 64, 64, "causal"): failed})
    with emulator.metal():
        plan = mlx_flash.explain(x, x, x, mask="causal")
    assert plan.implementation == "blockwise"
    assert "demo failed validation on this machine (float32 64x64 causal: forward kernel" in plan.reason
    assert "practical failed validation on this machine (float32 64x64 causal: dq kernel: CompileError" in plan.reason


def test_timing_check_failure_fails_the_kernel(cache, wrong_demo):
    config = harness.Config("fwd", 1, 40, 4, 2, 64, "causal", "float16")
    plan = grid.TimingPlan([config], ("mlx", "practical", "demo"), repeats=1)
    passed = [validation.Result(validation.Unit(f, "float16", 64, 64, "causal"), "passed") for f in ("practical", "demo")]
    rows, wrong = [], {}
    with emulator.metal(schedule="forward"):
        checkup.time_kernels(plan, passed, harness.Progress(0, stream=open(os.devnull, "w")), rows, wrong)
    (row,) = rows
    assert sorted(row["median_s"]) == ["mlx", "practical"] and all(t > 0 for t in row["median_s"].values())
    assert list(row["failed"]) == ["demo"] and "wrong result" in row["failed"]["demo"]
    assert row["kind"] == "causal"
    assert list(wrong) == ["demo/float16/64x64/causal"] and wrong["demo/float16/64x64/causal"]["status"] == "failed"


# ---- the verdict key -------------------------------------------------------------


def _failing_demo_entries():
    entry = {"status": "failed", "kernel": "forward", "detail": "wrong output: injected", "by": "test"}
    return {verdicts.unit_key("demo", "float16", 64, 64, kind): dict(entry) for kind in ("causal", "segments")}


@pytest.mark.parametrize("field", ["mlx", "kernels", "chip", "os", "mlx_flash"])
def test_verdicts_of_another_key_are_ignored(cache, field):
    q, k, v, _, ids = _packed()
    other = {**verdicts.machine_key("emulator"), field: "something else"}
    verdicts.record("emulator", _failing_demo_entries(), key=other)
    # The same entries in this key's own file, under the other key, are ignored too.
    here = verdicts.path_for(verdicts.machine_key("emulator"))
    here.parent.mkdir(parents=True, exist_ok=True)
    here.write_text(verdicts.path_for(other).read_text())
    assert verdicts.current("emulator") is None
    with emulator.metal():
        plan = mlx_flash.explain(q, k, v, mask="causal", segment_ids=ids)
    assert plan.implementation == "demo" and "failed validation" not in plan.reason
    assert "no doctor verdict on this machine" in plan.reason

    verdicts.record("emulator", _failing_demo_entries())  # this key: it counts
    with emulator.metal():
        plan = mlx_flash.explain(q, k, v, mask="causal", segment_ids=ids)
    assert plan.implementation == "practical" and "demo failed validation" in plan.reason


def test_a_cache_that_cannot_be_written_keeps_the_verdict_in_the_process(tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setenv("MLX_FLASH_CACHE", str(blocker))
    saved = verdicts.record("emulator", _failing_demo_entries())
    assert saved.unsaved.startswith("cannot write ")
    assert verdicts.current("emulator").status("demo", "float16", 64, 64, ("causal",))[0] == "failed"


# ---- first-use validation ----------------------------------------------------------


def test_validation_is_on_for_metal_and_off_for_the_emulator_by_default(monkeypatch):
    monkeypatch.delenv("MLX_FLASH_VALIDATE", raising=False)
    assert verdicts.validation_enabled("metal") and not verdicts.validation_enabled("emulator")
    monkeypatch.setenv("MLX_FLASH_VALIDATE", "0")
    assert not verdicts.validation_enabled("metal")
    monkeypatch.setenv("MLX_FLASH_VALIDATE", "1")
    assert verdicts.validation_enabled("emulator")


@pytest.mark.parametrize("setting", [None, "0"])
def test_first_use_validation_off(cache, wrong_demo, monkeypatch, setting):
    if setting is not None:
        monkeypatch.setenv("MLX_FLASH_VALIDATE", setting)
    q, k, v, _, ids = _packed()
    with emulator.metal():
        plan = mlx_flash.explain(q, k, v, mask="causal", segment_ids=ids)
    # Nothing validated the wrong kernel, so nothing stops it: the switch is off.
    assert plan.implementation == "demo" and "not validated on this machine" in plan.reason
    assert verdicts.current("emulator") is None and not cache.exists()


def test_first_use_validation_on(cache, wrong_demo, monkeypatch, capsys):
    monkeypatch.setenv("MLX_FLASH_VALIDATE", "1")
    checked = []
    check = validation.check
    monkeypatch.setattr(validation, "check", lambda unit, shape: checked.append(unit) or check(unit, shape))
    q, k, v, dout, ids = _packed()
    with emulator.metal():
        plan = mlx_flash.explain(q, k, v, mask="causal", segment_ids=ids)
        assert plan.implementation == "practical"
        assert "demo failed validation on this machine (float16 64x64 causal: forward kernel: wrong output" in plan.reason
        # Validated once per verdict key: later calls read the verdict.
        assert len(checked) == 4  # demo causal, segments; practical causal, segments
        mlx_flash.explain(q, k, v, mask="causal", segment_ids=ids)
        assert len(checked) == 4
    saved = _verdict_file()["kernels"]
    assert {key: (e["status"], e["by"]) for key, e in saved.items()} == {
        "demo/float16/64x64/causal": ("failed", "first use"),
        "demo/float16/64x64/segments": ("failed", "first use"),
        "practical/float16/64x64/causal": ("passed", "first use"),
        "practical/float16/64x64/segments": ("passed", "first use"),
    }
    # Validated at the call's heads (4 query heads on 2 KV heads), not the call's own arrays.
    assert {tuple(e["shape"][1:3]) for e in saved.values()} == {(4, 2)}
    assert "mlx-flash: validated the demo kernels for float16 64x64 (causal, segments)" in capsys.readouterr().err


def test_first_use_validation_runs_eagerly_inside_transforms(cache, monkeypatch):
    monkeypatch.setenv("MLX_FLASH_VALIDATE", "1")
    q, k, v, dout, ids = _packed()

    def loss(q, k, v, variant):
        out = mlx_flash.scaled_dot_product_attention(q, k, v, scale=0.125, mask="causal", segment_ids=ids, variant=variant)
        return mx.sum(out.astype(mx.float32) * dout.astype(mx.float32))

    with emulator.metal():
        grads = mx.grad(lambda q, k, v: loss(q, k, v, "auto"), argnums=(0, 1, 2))(q, k, v)
        mx.eval(grads)
    assert verdicts.current("emulator").status("demo", "float16", 64, 64, ("causal", "segments")) == ("passed", "")
    want = mx.grad(lambda q, k, v: loss(q, k, v, "manual"), argnums=(0, 1, 2))(q, k, v)
    for got, expected, name in zip(grads, want, ("dq", "dk", "dv")):
        assert_close(got, expected, (2e-3, 1e-2), name)

    # Inside mx.compile the call's arrays cannot be read, yet validation runs
    # on its own concrete inputs while the function is traced.
    window = mx.zeros((1, 2, 24, 64), mx.float16)

    def traced(x):
        plans.append(mlx_flash.explain(x, x, x, mask="causal", window=5))
        return x * 2

    plans = []
    with emulator.metal():
        mx.eval(mx.compile(traced)(window))
    assert plans[0].implementation == "demo"
    assert verdicts.current("emulator").status("demo", "float16", 64, 64, ("causal", "window")) == ("passed", "")


# ---- measured choice ---------------------------------------------------------------


def _timing(kind, seq, times, dtype="float16", dim=64, mode="fwdbwd"):
    mask = {"causal": "causal", "causal+segments": grid.PACKED}[kind]
    return {"mode": mode, "kind": kind, "mask": mask, "dtype": dtype, "head_dim": dim, "value_dim": dim,
            "seq": seq, "batch": 1, "heads": 4, "kv_heads": 2, "median_s": times, "failed": {}}  # fmt: skip


def test_auto_picks_the_fastest_validated_implementation(cache):
    passed = {"status": "passed", "kernel": "", "detail": "", "by": "test"}
    units = {verdicts.unit_key(f, "float16", 64, 64, kind): dict(passed)
             for f in ("demo", "practical") for kind in ("causal", "segments")}  # fmt: skip
    rows = [
        _timing("causal+segments", 512, {"demo": 0.002, "practical": 0.003, "mlx": 0.001, "blockwise": 0.02}),
        _timing("causal+segments", 4096, {"demo": 0.04, "practical": 0.01, "mlx": 0.005, "blockwise": 0.2}),
        _timing("causal+segments", 4096, {"demo": 0.001}, mode="fwd"),  # forward only: not how training is ranked
    ]
    verdicts.record("emulator", units, rows)

    def choice(length):
        q = mx.zeros((1, 4, length, 64), mx.float16)
        k = mx.zeros((1, 2, length, 64), mx.float16)
        ids = mx.zeros((1, length), mx.int32)
        with emulator.metal():
            return mlx_flash.explain(q, k, k, mask="causal", segment_ids=ids)

    # The closest measured length decides; MLX's op is not a candidate for
    # segments (it would materialise L x L scores), however fast it measured.
    plan = choice(700)
    assert plan.implementation == "demo"
    assert "fastest validated on this machine (doctor: fwd+bwd causal+segments float16 D=64 L=512: demo 2 ms" in plan.reason
    assert "mlx: not a candidate for this mask" in plan.reason
    assert choice(3000).implementation == "practical"
    with emulator.metal():  # what the doctor's report says auto picks for each timed problem
        assert [checkup.auto_choice(row) for row in rows[:2]] == ["demo", "practical"]
    # A kernel that failed is never chosen, however fast it measured.
    failed = {**passed, "status": "failed", "kernel": "dkdv", "detail": "wrong dk"}
    verdicts.record("emulator", {verdicts.unit_key("practical", "float16", 64, 64, "segments"): failed})
    plan = choice(3000)
    assert plan.implementation == "demo"
    assert "practical failed validation on this machine (float16 64x64 segments: dkdv kernel: wrong dk)" in plan.reason
    # Another mask kind has no timing: the default, and the doctor is named.
    with emulator.metal():
        x = mx.zeros((1, 4, 64, 64), mx.float16)
        plan = mlx_flash.explain(x, x, x, mask="causal", window=8)
    assert plan.implementation == "demo" and "no doctor timing for this case" in plan.reason


def test_metal_run_times_what_passed_and_records_it(cache, monkeypatch):
    """The doctor's Metal path (validation, then checked timing, rows, the
    verdict, the report), run here by putting the kernels on the emulator."""
    monkeypatch.setattr(checkup, "where_kernels_run", lambda emulated: "metal")
    tiny = grid.TimingPlan([harness.Config("fwdbwd", 1, 40, 4, 2, 64, "causal", "float16")], ("mlx", "practical", "demo"), 1)
    monkeypatch.setattr(grid, "timing_plan", lambda *args: tiny)
    with emulator.metal(schedule="forward"):
        findings = mlx_flash.doctor(dtypes=["float16"], head_dims=[64], masks=["causal"])
    assert findings.ok and findings.backend == "metal" and not findings.timing_note
    (row,) = findings.timings
    assert sorted(row["median_s"]) == ["demo", "mlx", "practical"] and not row["failed"]
    saved = json.loads(verdicts.path_for(verdicts.machine_key("metal")).read_text())
    assert saved["timings"] == [row] and len(saved["kernels"]) == 2
    text = str(findings)
    assert "| mode | mask | dtype | B | H/KV | D | L | mlx ms | demo ms | practical ms | auto |" in text
    assert "| fwdbwd | causal | float16 | 1 | 4/2 | 64 | 40 | " in text and "x) |" in text


# ---- model shapes and the report -----------------------------------------------------


def test_model_shapes_come_from_config_json(tmp_path):
    tinyllama = {"model_type": "llama", "num_attention_heads": 32, "num_key_value_heads": 4, "hidden_size": 2048,
                 "torch_dtype": "bfloat16"}  # fmt: skip
    folder = tmp_path / "tinyllama"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(tinyllama))
    g = grid.from_model(str(folder))
    assert (g.heads, g.kv_heads, g.head_dim, g.value_dim, g.dtype) == (32, 4, 64, 64, "bfloat16")
    assert (g.window, g.sinks) == (None, False)
    qwen = {"num_attention_heads": 12, "num_key_value_heads": 2, "hidden_size": 1536, "torch_dtype": "bfloat16",
            "sliding_window": 32768, "use_sliding_window": False}  # fmt: skip
    assert (grid.from_config(qwen, "qwen").head_dim, grid.from_config(qwen, "qwen").window) == (128, None)
    gpt_oss = {"model_type": "gpt_oss", "num_attention_heads": 64, "num_key_value_heads": 8, "head_dim": 64,
               "hidden_size": 2880, "sliding_window": 128, "torch_dtype": "bfloat16"}  # fmt: skip
    g = grid.from_config(gpt_oss, "gpt-oss")
    assert (g.head_dim, g.window, g.sinks) == (64, 128, True)
    deepseek = {"num_attention_heads": 16, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
                "hidden_size": 2048, "torch_dtype": "bfloat16"}  # fmt: skip
    assert (grid.from_config(deepseek, "ds").head_dim, grid.from_config(deepseek, "ds").value_dim) == (192, 128)
    gemma = {"model_type": "gemma3", "text_config": {"num_attention_heads": 8, "num_key_value_heads": 4, "head_dim": 256}}
    g = grid.from_config(gemma, "gemma")
    assert (g.heads, g.head_dim, g.dtype) == (8, 256, "float16") and "assuming float16" in g.notes[0]
    with pytest.raises(grid.DoctorError, match="no num_attention_heads"):
        grid.from_config({"hidden_size": 64}, "x")

    # The model's shapes are what is validated and timed.
    g = grid.from_model(str(folder))
    units = grid.validation_units("default", g)
    assert {(u.family, u.dtype, u.dim, u.value_dim) for u in units} == {(f, "bfloat16", 64, 64) for f in ("practical", "demo")}
    recipe = grid.Geometry("r", 32, 4, 64, 64, "bfloat16", window=1024, sinks=True, seq=2048, batch=2, packed=True)
    configs = grid.timing_plan("default", recipe).configs
    assert {(c.batch, c.heads, c.kv_heads, c.head_dim, c.dtype) for c in configs} == {(2, 32, 4, 64, "bfloat16")}
    assert sorted({c.seq for c in configs}) == [512, 1024, 2048]
    assert sorted({c.mask for c in configs}) == sorted(
        ["causal+sinks", f"{grid.PACKED}+sinks", "causal+window1024+sinks", f"{grid.PACKED}+window1024+sinks"]
    )


def test_recipe_shapes(tmp_path):
    # The shipped offline recipe: the built-in tiny llama, 4 packed rows of 512 tokens.
    g = grid.from_recipe(str(REPO / "recipes" / "quickstart.yaml"))
    assert (g.heads, g.kv_heads, g.head_dim, g.seq, g.batch, g.packed) == (4, 2, 16, 512, 4, True)
    assert [c.seq for c in grid.timing_plan("quick", g).configs] == [512, 512]
    # The kernels are timed against MLX, and beyond --quick against blockwise too.
    assert grid.timing_plan("quick", g).variants == ("mlx", "practical", "demo")
    assert grid.timing_plan("default", g).variants == ("mlx", "practical", "demo", "blockwise")
    with pytest.raises(grid.DoctorError, match="--recipe: recipe file not found"):
        grid.from_recipe(str(tmp_path / "missing.yaml"))


def test_report_gives_times_and_ratios_against_mlx():
    findings = checkup.Findings(
        "metal", "default", {"python": "3.11", "memory_bytes": 2**34, "source": None},
        {"chip": "Apple M9 (applegpu_g99)", "os": "macOS 99.0", "mlx": "0.32.4", "mlx_flash": "0.1.0", "kernels": "ab" * 32},
        "/cache/verdicts/metal-x.json",
        results=[validation.Result(validation.Unit("demo", "bfloat16", 128, 128, "causal"), "passed")],
        timings=[_timing("causal", 2048, {"mlx": 0.004, "demo": 0.002, "practical": 0.008}, "bfloat16", 128)],
        auto_choices=["demo"],
    )  # fmt: skip
    text = report.render(findings)
    assert "- chip: Apple M9 (applegpu_g99)" in text and "- OS: macOS 99.0" in text
    assert "| fwdbwd | causal | bfloat16 | 1 | 4/2 | 128 | 2048 | 4 | 2 (2.00x) | 8 (0.50x) | demo |" in text
    assert "Metal time" not in text  # these are Metal times
