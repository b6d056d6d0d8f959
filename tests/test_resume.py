"""Stopping and resuming a fine-tune: a resumed run is the run that never stopped.

Every test compares with an uninterrupted run of the same recipe and seed:
the same loss at every iteration, the same validation losses, the same final
adapters. Runs stop by SIGINT or SIGTERM at an iteration that is not a
checkpoint boundary (``save_every`` is 4), in the middle of gradient
accumulation, with LoRA dropout drawing random numbers, with the step
compiled as on a GPU, and by SIGKILL while a checkpoint is being written.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from mlx_flash.finetune.__main__ import main
from mlx_flash.finetune.batches import Batches

from finetune_runs import FAST, ONE, QUICKSTART, cache, cli, one_error_line, read_records  # noqa: F401

ITERS = 16
PLAIN = [*FAST, *ONE, "--set", f"iters={ITERS}"]
# Updates every 3 iterations, dropout that draws from mx.random every step,
# and a learning rate that warms up and decays with the optimizer's step count.
ACCUMULATING = [*PLAIN, "--set", "grad_accumulation_steps=3", "--set", "lora_parameters.dropout=0.1",
                "--set", "lr_schedule={name: cosine_decay, arguments: [3.0e-3, 6], warmup: 2}"]  # fmt: skip

# Runs the command in a child that signals itself, or hangs in a checkpoint
# write, at a chosen point, so that a test can stop it exactly there.
DRIVER = """
import os, signal, sys, time
from pathlib import Path
from mlx_flash.finetune import files, train
from mlx_flash.finetune.__main__ import main

mode, at = sys.argv[1], sys.argv[2]
if mode.startswith("SIG"):
    # The signal(s) arrive as iteration `at` fetches its batch, before its step.
    signals = [getattr(signal, name) for name in mode.split("+")]
    batch = train.Batches.batch
    def signalling(self, k):
        if k == int(at) - 1:
            for s in signals:
                os.kill(os.getpid(), s)
        return batch(self, k)
    train.Batches.batch = signalling
else:
    # mode "hang": stop for good while writing `file`.json of iteration `at`.
    name, iteration = at.split(":")
    write_json = files.write_json
    def hanging(path, value):
        if Path(path).name == name + ".json" and value.get("iteration") == int(iteration):
            Path(os.environ["HANG_MARKER"]).touch()
            time.sleep(600)
        write_json(path, value)
    files.write_json = hanging
sys.exit(main(sys.argv[3:]))
"""


def drive(tmp_path, mode, at, args, marker=None):
    script = tmp_path / "driver.py"
    script.write_text(DRIVER)
    env = dict(os.environ, PYTHONUNBUFFERED="1", HANG_MARKER=str(marker or tmp_path / "marker"))
    command = [sys.executable, str(script), mode, str(at), *map(str, args)]
    return subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Uninterrupted runs of both recipes: name -> run folder."""
    runs = {}
    for name, args in (("plain", PLAIN), ("accumulating", ACCUMULATING)):
        out = tmp_path_factory.mktemp(f"reference-{name}")
        assert main([str(QUICKSTART), *args, "--out", str(out)]) == 0
        runs[name] = out / "manual"
    return runs


def assert_same_run(run: Path, reference: Path, iters: int = ITERS):
    got, want = read_records(run / "metrics.jsonl"), read_records(reference / "metrics.jsonl")
    assert [r["iteration"] for r in got] == list(range(1, iters + 1))
    want = want[:iters]
    for g, w in zip(got, want):
        assert g["tokens"] == w["tokens"], g["iteration"]
        assert g["loss"] == pytest.approx(w["loss"], rel=1e-6, abs=1e-7), g["iteration"]
        assert g["learning_rate"] == pytest.approx(w["learning_rate"], rel=1e-7)
        assert ("val_loss" in g) == ("val_loss" in w)
        if "val_loss" in w:
            assert g["val_loss"] == pytest.approx(w["val_loss"], rel=1e-6)
    adapters = mx.load(str(run / "adapters" / "adapters.safetensors"))
    expected = mx.load(str(reference / "adapters" / "adapters.safetensors"))
    assert adapters.keys() == expected.keys()
    for key in expected:
        assert mx.allclose(adapters[key], expected[key], rtol=1e-5, atol=1e-7).item(), key


def checkpoint_iteration(run: Path) -> int:
    latest = json.loads((run / "checkpoints" / "latest.json").read_text())
    state = json.loads((run / "checkpoints" / latest["checkpoint"] / "state.json").read_text())
    assert state["iteration"] == latest["iteration"]
    return latest["iteration"]


@pytest.mark.parametrize(
    "name, signum, recipe",
    [("SIGINT", signal.SIGINT, "plain"), ("SIGTERM", signal.SIGTERM, "accumulating")],
)
def test_stopped_then_resumed_run_equals_the_uninterrupted_run(tmp_path, reference, name, signum, recipe):
    args = PLAIN if recipe == "plain" else ACCUMULATING
    out = tmp_path / "run"
    proc = drive(tmp_path, name, 7, [QUICKSTART, *args, "--out", out])
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == {signal.SIGINT: 130, signal.SIGTERM: 143}[signum], err
    assert "Traceback" not in err
    # Iteration 7 (no checkpoint boundary, mid-accumulation) finishes, then the run saves and stops.
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"mlx_flash.finetune: {'Ctrl-C' if name == 'SIGINT' else 'SIGTERM'}: stopped after iteration 7:")
    assert "--set resume=true continues" in last
    run = out / "manual"
    assert checkpoint_iteration(run) == 7
    assert [r["iteration"] for r in read_records(run / "metrics.jsonl")] == list(range(1, 8))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["interrupted"] and summary["iterations"] == 7 and summary["checkpoint_iteration"] == 7
    assert summary["stopped_by"] == ("Ctrl-C" if name == "SIGINT" else "SIGTERM")
    saved = sorted(p.name for p in (run / "checkpoints" / "0000007").iterdir())
    extra = ["gradients.safetensors"] if recipe == "accumulating" else []
    assert saved == sorted(["adapters.safetensors", "optimizer.safetensors", "state.json", *extra])

    assert main([str(QUICKSTART), *args, "--set", "resume=true", "--out", str(out)]) == 0
    assert_same_run(run, reference[recipe])
    summary = json.loads((run / "summary.json").read_text())
    assert summary["resumed"] and summary["resumed_from_iteration"] == 7 and not summary["interrupted"]
    assert summary["iterations"] == ITERS and summary["checkpoint_iteration"] == ITERS
    want = json.loads((reference[recipe] / "summary.json").read_text())
    assert summary["initial_val_loss"] == pytest.approx(want["initial_val_loss"], rel=1e-6)
    assert summary["final_val_loss"] == pytest.approx(want["final_val_loss"], rel=1e-6)


@pytest.mark.parametrize("hang_in", ["state", "latest"])
def test_sigkill_while_a_checkpoint_is_written_keeps_the_last_complete_one(tmp_path, reference, hang_in):
    # Killed while checkpoint 8 is half-written (its state.json not yet there),
    # or written but not yet named in latest.json: checkpoint 4 stays the latest.
    out, marker = tmp_path / "run", tmp_path / "hanging"
    proc = drive(tmp_path, "hang", f"{hang_in}:8", [QUICKSTART, *PLAIN, "--out", out], marker=marker)
    deadline = time.time() + 120
    while not marker.exists():
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1]
        time.sleep(0.05)
    proc.kill()
    proc.communicate(timeout=60)
    run = out / "manual"
    assert checkpoint_iteration(run) == 4
    leftovers = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert "0000004" in leftovers and "latest.json" in leftovers
    assert len(leftovers) == 3  # and the unfinished checkpoint 8, under some name
    # The metrics ran ahead of the checkpoint; resume cuts them back and redoes 5..8.
    assert len(read_records(run / "metrics.jsonl")) == 8

    result = cli(QUICKSTART, *PLAIN, "--set", "resume=true", "--out", out)
    assert result.returncode == 0, result.stderr
    assert "[manual] resuming from iteration 4" in result.stderr
    assert_same_run(run, reference["plain"])
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [f"{ITERS:07d}", "latest.json"]


def test_second_signal_stops_at_once_and_keeps_the_last_checkpoint(tmp_path, reference):
    out = tmp_path / "run"
    proc = drive(tmp_path, "SIGINT+SIGINT", 7, [QUICKSTART, *PLAIN, "--out", out])
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert "stopped at once during iteration 7; the last checkpoint is iteration 4" in err.strip().splitlines()[-1]
    run = out / "manual"
    assert checkpoint_iteration(run) == 4
    # Metrics and summary agree with the checkpoint, not with the cut-off iteration.
    assert [r["iteration"] for r in read_records(run / "metrics.jsonl")] == [1, 2, 3, 4]
    assert json.loads((run / "summary.json").read_text())["iterations"] == 4
    assert main([str(QUICKSTART), *PLAIN, "--set", "resume=true", "--out", str(out)]) == 0
    assert_same_run(run, reference["plain"])


def test_sigterm_from_outside_saves_a_consistent_checkpoint(tmp_path):
    # A real signal from another process, at whatever iteration it lands.
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "mlx_flash.finetune", str(QUICKSTART), *PLAIN, "--set", "iters=100000",
         "--out", str(out)],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    metrics = out / "manual" / "metrics.jsonl"
    deadline = time.time() + 120
    while not metrics.exists() or len(metrics.read_text().splitlines()) < 6:
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1]
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143 and "Traceback" not in err, err
    run = out / "manual"
    done = checkpoint_iteration(run)
    assert [r["iteration"] for r in read_records(metrics)] == list(range(1, done + 1))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["iterations"] == done and summary["stopped_by"] == "SIGTERM"
    saved = mx.load(str(run / "checkpoints" / f"{done:07d}" / "adapters.safetensors"))
    adapters = mx.load(str(run / "adapters" / "adapters.safetensors"))
    assert all(mx.array_equal(saved[k], adapters[k]).item() for k in saved)


def test_finished_run_extended_equals_a_longer_run(tmp_path, reference):
    out = tmp_path / "run"
    assert main([str(QUICKSTART), *PLAIN, "--set", "iters=12", "--out", str(out)]) == 0
    assert main([str(QUICKSTART), *PLAIN, "--set", "resume=true", "--out", str(out)]) == 0
    assert_same_run(out / "manual", reference["plain"])


def test_resume_below_the_checkpoint_is_one_line_and_changes_nothing(tmp_path):
    out = tmp_path / "run"
    assert main([str(QUICKSTART), *PLAIN, "--set", "iters=12", "--out", str(out)]) == 0
    run = out / "manual"
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    result = cli(QUICKSTART, *PLAIN, "--set", "iters=10", "--set", "resume=true", "--out", out)
    assert result.returncode == 2
    line = one_error_line(result.stderr)
    assert "iters: 10 is below iteration 12 of the checkpoint in" in line and "--overwrite" in line
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before


def test_resume_under_a_changed_recipe_is_one_line(tmp_path):
    out = tmp_path / "run"
    assert main([str(QUICKSTART), *PLAIN, "--set", "iters=4", "--out", str(out)]) == 0
    result = cli(QUICKSTART, *PLAIN, "--set", "batch_size=2", "--set", "resume=true", "--out", out)
    assert result.returncode == 2
    line = one_error_line(result.stderr)
    assert "resume: batch_size is 2 but the checkpoint at iteration 4" in line and "was trained with 4" in line
    assert "resume_adapter_file=" in line
    # --check says the same before anything runs, and where a valid resume would start.
    assert one_error_line(cli(QUICKSTART, *PLAIN, "--set", "batch_size=2", "--set", "resume=true",
                              "--out", out, "--check").stderr) == line  # fmt: skip
    result = cli(QUICKSTART, *PLAIN, "--set", "resume=true", "--out", out, "--check")
    assert result.returncode == 0 and "resumes from iteration 4" in result.stdout


def test_a_damaged_checkpoint_is_refused(tmp_path):
    out = tmp_path / "run"
    assert main([str(QUICKSTART), *PLAIN, "--set", "iters=4", "--out", str(out)]) == 0
    weights = out / "manual" / "checkpoints" / "0000004" / "optimizer.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    result = cli(QUICKSTART, *PLAIN, "--set", "resume=true", "--out", out)
    assert result.returncode == 2
    assert f"{weights} does not match the checkpoint's record of it" in one_error_line(result.stderr)


def test_batch_order_is_mlx_lms_and_independent_of_numpys_global_generator():
    from mlx_lm.tuner.trainer import iterate_batches

    rng = np.random.RandomState(1)
    dataset = [(list(range(1, 2 + n)), 0) for n in rng.randint(1, 90, size=23)]
    ours = Batches(dataset, batch_size=4, max_seq_length=64, seed=3)
    theirs = iterate_batches(dataset, batch_size=4, max_seq_length=64, loop=True, seed=3)
    seen = []
    for k in range(3 * len(ours)):  # three epochs
        want_tokens, want_lengths = next(theirs)
        tokens, lengths = ours.batch(k)
        assert tokens.shape == want_tokens.shape and mx.array_equal(tokens, want_tokens).item(), k
        assert mx.array_equal(lengths, want_lengths).item()
        seen.append(tokens)
    # Draws from NumPy's global generator (as each validation makes) change nothing,
    # and any batch can be asked for first: a resumed run starts mid-way.
    again = Batches(dataset, batch_size=4, max_seq_length=64, seed=3)
    for k in reversed(range(len(seen))):
        np.random.rand(7)
        assert mx.array_equal(again.batch(k)[0], seen[k]).item(), k
    assert ours.truncated() == sum(len(t) > 64 for t, _ in dataset) > 0


def test_compiled_step_resumes_exactly(tmp_path, monkeypatch):
    # GPUs run the step under mx.compile, with the model, optimizer and random
    # state as its inputs and outputs: a restored state must reach the graph.
    # Compiled here on the CPU (slower to build, the same code path).
    from mlx_flash.finetune import train

    monkeypatch.setattr(train, "compile_step", lambda: True)
    recipe = [str(QUICKSTART), *ACCUMULATING, "--set", "iters=8"]
    assert main([*recipe, "--out", str(tmp_path / "whole")]) == 0
    assert main([*recipe, "--set", "iters=4", "--out", str(tmp_path / "parts")]) == 0  # mid-accumulation
    assert main([*recipe, "--set", "resume=true", "--out", str(tmp_path / "parts")]) == 0
    assert json.loads((tmp_path / "parts" / "manual" / "summary.json").read_text())["compiled_step"]
    assert_same_run(tmp_path / "parts" / "manual", tmp_path / "whole" / "manual", iters=8)
