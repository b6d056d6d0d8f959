"""What a user of the fine-tune sees: comparisons that hold still under load,
tables that say what they measured, no silent phase, mlx-lm's conventions.

Runs use the built-in tiny llama at a few iterations; the report's tables are
also checked on summaries made up here, so every column rule is exercised.
"""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import pytest

from mlx_flash.finetune import report
from mlx_flash.finetune.__main__ import main

from finetune_runs import FAST, ONE, QUICKSTART, cache, cli, one_error_line, read_records  # noqa: F401


# ---- interleaving ---------------------------------------------------------------


def test_variants_train_in_turns_and_each_equals_its_run_alone(tmp_path, monkeypatch):
    from mlx_flash.finetune import train

    # Dropout draws from mx.random every step: each run must keep its own stream.
    recipe = [str(QUICKSTART), *FAST, "--set", "lora_parameters.dropout=0.1", "--set", "max_seq_length=256"]
    assert main([*recipe, *ONE, "--out", str(tmp_path / "alone")]) == 0

    order = []
    one_iteration = train.one_iteration

    def recording(run, iteration):
        order.append((run.entry, iteration))
        return one_iteration(run, iteration)

    monkeypatch.setattr(train, "one_iteration", recording)
    out = tmp_path / "together"
    assert main([*recipe, "--set", "attention.compare=[manual, blockwise]", "--out", str(out)]) == 0
    # 8 iterations in 8 windows of 1: A B A B ...
    assert order == [(v, i) for i in range(1, 9) for v in ("manual", "blockwise")]
    alone, together = read_records(tmp_path / "alone" / "manual" / "metrics.jsonl"), read_records(out / "manual" / "metrics.jsonl")
    assert [r["loss"] for r in together] == [r["loss"] for r in alone]
    assert [r.get("val_loss") for r in together] == [r.get("val_loss") for r in alone]
    a = mx.load(str(tmp_path / "alone" / "manual" / "adapters" / "adapters.safetensors"))
    b = mx.load(str(out / "manual" / "adapters" / "adapters.safetensors"))
    assert all(mx.array_equal(a[k], b[k]).item() for k in a)
    # The other run's weights are left out of each run's peak memory.
    peak_alone = json.loads((tmp_path / "alone" / "manual" / "summary.json").read_text())["peak_memory_bytes"]
    peak_together = json.loads((out / "manual" / "summary.json").read_text())["peak_memory_bytes"]
    assert abs(peak_together - peak_alone) < 0.2 * peak_alone
    compare = json.loads((out / "compare.json").read_text())
    assert compare["interleaved"]["window_iterations"] == 1
    loads = compare["interleaved"]["load_average_1min"]
    assert len(loads) == 8 and all(isinstance(x, float) for x in loads)
    markdown = (out / "compare.md").read_text()
    assert f"Load average (1 min) at the start of each window: {min(loads):.2f}-{max(loads):.2f}" in markdown


# ---- the report -----------------------------------------------------------------


def _summary(variant, packed, implementation, tokens=1000, peak=10**7, packing=None, width=2, **extra):
    return {
        "variant": variant, "implementation": implementation, "backend": "mlx ops", "iterations": 2,
        "median_iteration_s": 0.5, "p95_iteration_s": 0.6, "tokens_per_s": tokens, "packed": packed,
        "fill_ratio": 0.9 if packed else 0.6, "peak_memory_bytes": peak, "final_train_loss": 1.0,
        "train_loss_last10": 1.1, "initial_val_loss": None, "final_val_loss": 0.9, "packing": packing,
        "interleaved": {"window_iterations": width, "load_average_1min": [1.5, 2.5]},
        "machine": {"cpu_cores": 2}, **extra,
    }  # fmt: skip


def _records(times, tokens=100):
    """Two iterations per window: a warm-up first, then steady iterations of ``times`` seconds."""
    records = [{"iteration": 1, "tokens": tokens, "wall_s": 9.0, "warmup": True, "loss": 2.0, "tokens_per_s": 1}]
    for i, t in enumerate(times, start=2):
        records.append({"iteration": i, "tokens": tokens, "wall_s": t, "loss": 1.0, "tokens_per_s": tokens / t})
    return records


def test_ratio_is_median_and_range_over_windows():
    stock = _summary("mlx:padded", False, "mlx")
    fused = _summary("blockwise", True, "blockwise", packing={"max_document_loss_difference": 1e-6})
    # Windows of 2 iterations: {1, 2}, {3, 4}, {5, 6}, {7}; iteration 1 (warm-up) is left out.
    metrics = {"mlx:padded": _records([1.0] * 6), "blockwise": _records([0.5, 0.25, 0.25, 0.5, 0.5, 0.25])}
    rows = {r["variant"]: r for r in report.rows([stock, fused], metrics)}
    ratio = rows["blockwise"]["tokens_vs_stock"]
    assert ratio == {"median": 3.0, "min": 2.0, "max": 4.0, "windows": 4}
    assert report.ratio_text(ratio) == "3.00x (2.00-4.00x over 4 windows)"
    throughput = rows["blockwise"]["tokens_per_s_windows"]
    assert (throughput["min"], throughput["max"]) == (200.0, 400.0)


def test_a_range_that_takes_in_one_is_no_measurable_difference():
    assert report.ratio_text({"median": 1.2, "min": 0.9, "max": 1.5, "windows": 4}) == (
        "no measurable difference (0.90-1.50x over 4 windows)"
    )
    assert report.ratio_text({"median": 0.8, "min": 0.7, "max": 0.95, "windows": 4}).startswith("0.80x")
    assert report.ratio_text({"median": 1.3, "min": 1.3, "max": 1.3, "windows": 1}) == "1.30x (1 window: no spread measured)"


def _tables(markdown):
    """The header cells of each Markdown table, in order."""
    headers, previous = [], ""
    for line in markdown.splitlines():
        if line.startswith("|---") or line.startswith("|--:"):
            headers.append([c.strip() for c in previous.strip("|").split("|")])
        previous = line
    return headers


def test_compare_md_leads_with_a_short_table_and_drops_empty_columns():
    summaries = [
        _summary("mlx:padded", False, "mlx", tokens=1000),
        _summary("mlx", True, "mlx", tokens=1500, peak=4 * 10**7, packing={"max_document_loss_difference": 2e-6}),
        _summary("blockwise", True, "blockwise", tokens=2000, peak=10**7, packing={"max_document_loss_difference": 0.0}),
    ]
    metrics = {s["variant"]: _records([100 / s["tokens_per_s"]] * 4) for s in summaries}
    environment = {"machine": {"chip": "Test CPU", "cpu_cores": 2, "backend": "cpu", "os": "Linux", "mlx_version": "0",
                               "mlx_flash_version": "0", "blas": "OpenBLAS 0.3.21 (pthreads)"},
                   "device": "cpu", "mlx_lm": "0"}  # fmt: skip
    markdown = report.markdown("r", report.rows(summaries, metrics), environment, summaries)
    short, detail = _tables(markdown)
    assert short == [
        "variant", "what ran", "real tokens/s, median (range) over windows", "real tokens/s vs mlx:padded (stock mlx-lm)",
        "peak memory (MB)", "val loss, last eval", "packing check (exact if ~0)",
    ]  # fmt: skip
    lines = markdown.split("## Details")[0].splitlines()
    row = {line.split("|")[1].strip(): line for line in lines if line.startswith("| ") and "what ran" not in line}
    assert "| stock mlx-lm: padded rows, MLX attention |" in row["mlx:padded"]
    assert "| packed rows, dense L x L document mask (MLX) |" in row["mlx"]
    assert "| baseline |" in row["mlx:padded"] and "2.00x" in row["blockwise"]
    # No manual run: no "vs manual" columns; both iteration ratios name their rows.
    assert not any("manual" in h for h in detail)
    assert "iteration speedup vs mlx, same rows" in detail and "train loss, mean of last 2 iterations" in detail
    assert "Hardware: Test CPU (2 CPU cores, BLAS OpenBLAS 0.3.21 (pthreads))" in markdown
    assert "Load average (1 min) at the start of each window: 1.50-2.50 on 2 cores" in markdown

    # Padded runs only: nothing was packed, so no packing check column at all.
    padded = [_summary("mlx", False, "mlx"), _summary("manual", False, "manual")]
    metrics = {s["variant"]: _records([0.5] * 4) for s in padded}
    short, detail = _tables(report.markdown("r", report.rows(padded, metrics), environment, padded))
    assert "packing check (exact if ~0)" not in short
    assert "iteration speedup vs manual, same rows" in detail


def test_plot_shows_real_tokens_per_second_not_step_times(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    import matplotlib.axes

    plotted = []
    original = matplotlib.axes.Axes.plot
    monkeypatch.setattr(matplotlib.axes.Axes, "plot", lambda self, x, y, **kw: (plotted.append(list(y)), original(self, x, y, **kw))[1])
    records = _records([0.5, 0.25])
    assert report.plot(tmp_path / "c.png", {"blockwise": records}) is not None
    losses, tokens = plotted
    assert losses == [r["loss"] for r in records]
    assert tokens == [200.0, 400.0]  # real tokens/s of the steady iterations, not seconds


# ---- nothing silent -------------------------------------------------------------


def _tiny_data(tmp_path, n=8):
    data = tmp_path / "data"
    data.mkdir()
    lines = "".join(json.dumps({"text": f"Q: {i} plus 1? A: {i + 1}."}) + "\n" for i in range(n))
    (data / "train.jsonl").write_text(lines)
    (data / "valid.jsonl").write_text(lines)
    return data


def test_rows_repeated_to_fill_a_step_are_announced(tmp_path):
    data = _tiny_data(tmp_path)
    result = cli(QUICKSTART, *FAST, *ONE, "--set", f"data={data}", "--set", "iters=1", "--set", "max_seq_length=256",
                 "--out", tmp_path / "o")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert (
        "[manual] the 8 training examples pack into 1 row(s) of 256 tokens, fewer than batch_size 4: rows are "
        "repeated to fill each step, so an epoch is 1 step(s) over the same 1 unique row(s)"
    ) in result.stderr


def test_resume_without_a_checkpoint_says_it_starts_fresh(tmp_path):
    result = cli(QUICKSTART, *FAST, *ONE, "--set", "iters=1", "--set", "resume=true", "--out", tmp_path / "o")
    assert result.returncode == 0, result.stderr
    assert f"[manual] resume: true, but {tmp_path / 'o' / 'manual'} holds no checkpoint yet: starting at iteration 1" in result.stderr


def test_every_phase_before_training_prints_a_line(tmp_path):
    result = cli(QUICKSTART, *FAST, *ONE, "--set", "iters=1", "--out", tmp_path / "o")
    assert result.returncode == 0, result.stderr
    lines = result.stderr.splitlines()
    expected = ["[manual] loading model builtin:tiny-llama", "[manual] tokenizing 320 train examples",
                "[manual] packing 320 training examples into rows of 64 tokens",
                "[manual] validating before training (2 batch(es))"]  # fmt: skip
    at = [next(i for i, line in enumerate(lines) if line.startswith(e)) for e in expected]
    assert at == sorted(at)


# A long step: a chain of matrix products inside one mx.eval, during which
# Python runs no signal handler. The driver signals itself from a thread once
# iteration 3's step is under way: once, then again.
SLOW_DRIVER = """
import os, signal, sys, threading, time
import mlx.core as mx
from mlx_flash.finetune import train
from mlx_flash.finetune.__main__ import main

step = train.make_step
def slow_step(*args, **kwargs):
    fn, compiled = step(*args, **kwargs)
    calls = [0]
    def slow(batch, previous, update):
        calls[0] += 1
        out = fn(batch, previous, update)
        if calls[0] == 3:
            def signals():
                time.sleep(1.0)
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(1.0)
                os.kill(os.getpid(), signal.SIGTERM)
            threading.Thread(target=signals, daemon=True).start()
            a = mx.random.normal((512, 512)) / 23
            b = a
            for _ in range(20000):
                b = b @ a
            mx.eval(b)  # minutes on one core: far longer than the test waits
        return out
    return slow, compiled
train.make_step = slow_step
sys.exit(main(sys.argv[1:]))
"""


def test_a_stop_during_a_long_step_is_truthful_and_a_second_stops_at_once(tmp_path):
    script = tmp_path / "driver.py"
    script.write_text(SLOW_DRIVER)
    out = tmp_path / "o"
    started = time.time()
    result = subprocess.run(
        [sys.executable, str(script), str(QUICKSTART), *FAST, *ONE, "--set", "save_every=2", "--out", str(out)],
        capture_output=True, text=True, cwd=tmp_path, timeout=120, env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )  # fmt: skip
    took = time.time() - started
    assert result.returncode == 143, result.stderr
    assert "Traceback" not in result.stderr
    err = result.stderr
    # The first SIGTERM is answered at once, not after the step, and says what it waits for.
    assert "SIGTERM: stopping after the iteration 3 of manual (running" in err
    assert "its iterations take about" in err and "SIGTERM again stops at once, keeping the last checkpoint (iteration 2)" in err
    last = err.strip().splitlines()[-1]
    assert last.startswith("mlx_flash.finetune: SIGTERM: stopped at once during the iteration 3 of manual; last checkpoints: manual iteration 2")
    assert took < 60
    latest = json.loads((out / "manual" / "checkpoints" / "latest.json").read_text())
    assert latest["iteration"] == 2


# ---- mlx-lm's conventions -------------------------------------------------------


def test_check_says_a_hub_model_cannot_be_fetched(tmp_path):
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    result = cli(QUICKSTART, "--set", "model=someone/some-model", "--check", env=env)
    assert result.returncode == 2
    assert "model: someone/some-model is not in the Hugging Face cache" in one_error_line(result.stderr)
    assert "HF_HUB_OFFLINE is on" in result.stderr
    # A hub that does not answer: the same, with the reason.
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT="http://127.0.0.1:9", HF_HUB_ETAG_TIMEOUT="2")
    env.pop("HF_HUB_OFFLINE", None)
    result = cli(QUICKSTART, "--set", "model=someone/some-model", "--check", env=env)
    assert result.returncode == 2
    assert "and cannot be fetched from http://127.0.0.1:9 now" in one_error_line(result.stderr)


def test_check_says_a_cached_hub_model_needs_no_download(tmp_path):
    from mlx_flash.finetune import builtin

    # A Hugging Face cache laid out as huggingface_hub writes it.
    cache = tmp_path / "hf" / "hub" / "models--someone--tiny"
    snapshot = cache / "snapshots" / ("0" * 40)
    builtin.write_model(snapshot, builtin.MODELS["tiny-llama"])
    (cache / "refs").mkdir(parents=True)
    (cache / "refs" / "main").write_text("0" * 40)
    env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    result = cli(QUICKSTART, "--set", "model=someone/tiny", "--check", env=env)
    assert result.returncode == 0, result.stderr
    assert f"# model someone/tiny: in the Hugging Face cache ({snapshot}); nothing to download" in result.stdout


def test_shipped_recipes_keep_adapters_in_each_run_folder(tmp_path):
    result = cli(QUICKSTART, "--check", "--out", tmp_path / "o")
    assert result.returncode == 0, result.stderr
    assert f"# blockwise: metrics in {tmp_path / 'o' / 'blockwise'}, adapters in {tmp_path / 'o' / 'blockwise' / 'adapters'}" in result.stdout


def test_make_installs_the_plot_extra():
    makefile = (Path(__file__).resolve().parents[1] / "Makefile").read_text()
    install = [line for line in makefile.splitlines() if "pip install" in line and " -e " in line]
    assert len(install) == 1 and "plot" in install[0].split("-e", 1)[1]


def test_long_iterations_each_get_a_progress_line(monkeypatch):
    import io

    from mlx_flash.finetune import progress

    clock = [0.0]
    monkeypatch.setattr(progress.time, "perf_counter", lambda: clock[0])
    stream = io.StringIO()
    bar = progress.Progress(100, "manual", every=10, stream=stream)
    for iteration in (1, 2, 3):
        clock[0] += 2.0  # short iterations: only every 10th gets a line
        bar.update(iteration, 1.0)
    assert stream.getvalue() == ""
    for iteration in (4, 5):
        clock[0] += progress.QUIET_S + 1  # long ones: a line each
        bar.update(iteration, 1.0)
    assert [line.split("|")[0] for line in stream.getvalue().splitlines()] == ["[manual]   4/100 ", "[manual]   5/100 "]


def test_a_stopped_comparison_resumes_to_the_uninterrupted_one(tmp_path):
    from test_resume import assert_same_run, drive

    recipe = [str(QUICKSTART), *FAST, "--set", "max_seq_length=256", "--set", "attention.compare=[manual, blockwise]"]
    assert main([*recipe, "--out", str(tmp_path / "whole")]) == 0
    out = tmp_path / "parts"
    # Ctrl-C as manual fetches iteration 5's batch: manual finishes 5, blockwise
    # (its turn comes next) stays at 4, and both save.
    proc = drive(tmp_path, "SIGINT", 5, [*recipe, "--out", out])
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert "Ctrl-C: stopped manual after iteration 5, blockwise after iteration 4, each with a checkpoint" in err.strip().splitlines()[-1]
    assert main([*recipe, "--set", "resume=true", "--out", str(out)]) == 0
    for variant in ("manual", "blockwise"):
        assert_same_run(out / variant, tmp_path / "whole" / variant, iters=8)
