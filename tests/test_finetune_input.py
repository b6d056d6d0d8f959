"""python -m mlx_flash.finetune on what users bring: mlx-lm configs, their own
data, and folders, caches and networks that do not cooperate.

Every bad input is exit status 2 and one line naming the file, line or key,
with no traceback and nothing already written lost.
"""

import json
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import mlx.core as mx
import pytest
import yaml

from mlx_flash.finetune.__main__ import main
from mlx_flash.finetune.config import RecipeError, load_recipe, parse_size

from finetune_runs import FAST, ONE, QUICKSTART, REPO, cache, cli, last_error_line, one_error_line, read_records  # noqa: F401

DATA = REPO / "recipes" / "data"
SMALL = ["--set", "iters=2", "--set", "batch_size=4", "--set", "max_seq_length=64", "--set", "val_batches=1",
         "--set", "steps_per_eval=2", "--set", "learning_rate=1e-3"]  # fmt: skip

# mlx-lm 0.32's example LoRA config (mlx_lm/examples/lora_config.yaml in its
# repository; the wheel does not ship it), key for key, value for value.
MLX_LM_EXAMPLE = """
model: "mlx-community/Llama-3.2-1B-Instruct-bf16"
train: true
fine_tune_type: lora
optimizer: adamw
data: "mlx-community/WikiSQL"
seed: 0
num_layers: 16
batch_size: 4
iters: 1000
val_batches: 25
learning_rate: 1e-5
steps_per_report: 10
steps_per_eval: 200
grad_accumulation_steps: 1
resume_adapter_file: null
adapter_path: "adapters"
save_every: 100
test: false
test_batches: 100
max_seq_length: 2048
grad_checkpoint: false
lora_parameters:
  keys: ["self_attn.q_proj", "self_attn.v_proj"]
  rank: 8
  scale: 20.0
  dropout: 0.0
"""


def mlx_lm_example(tmp_path) -> Path:
    import mlx_lm

    shipped = Path(mlx_lm.__file__).parent / "examples" / "lora_config.yaml"
    path = tmp_path / "lora_config.yaml"
    if shipped.exists():
        shutil.copy(shipped, path)
    else:
        path.write_text(MLX_LM_EXAMPLE)
    return path


def test_mlx_lms_example_config_trains_with_the_builtin_model(tmp_path):
    config = mlx_lm_example(tmp_path)
    out = tmp_path / "out"
    # The built-in model has 2 layers (the example asks for 16) and there is no
    # network for the example's hub dataset: those two are swapped too.
    work = tmp_path / "work"
    work.mkdir()
    result = cli(config, "--set", "model=builtin:tiny-llama", "--set", f"data={DATA}", "--set", "num_layers=2",
                 *SMALL, "--out", out, cwd=work)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "warning" not in result.stderr and "Traceback" not in result.stderr
    run = out / "auto"
    # Its adapter_path ("adapters") means what it means to mlx_lm.lora: a
    # folder in the working directory; a line at the start says so.
    assert f"[auto] adapters go to {work / 'adapters'} (adapter_path, read as mlx_lm.lora reads it)" in result.stderr
    assert not (run / "adapters").exists()
    adapters = mx.load(str(work / "adapters" / "adapters.safetensors"))
    # Its lora_parameters.keys are honoured: q and v projections only, in both layers.
    assert {k.rsplit(".", 1)[0] for k in adapters} == {
        f"model.layers.{i}.self_attn.{p}_proj" for i in range(2) for p in ("q", "v")
    }
    saved = json.loads((work / "adapters" / "adapter_config.json").read_text())
    example = yaml.safe_load(config.read_text())
    assert saved["optimizer"] == example["optimizer"] == "adamw"
    assert saved["grad_accumulation_steps"] == 1 and saved["test_batches"] == example["test_batches"]
    assert len(read_records(run / "metrics.jsonl")) == 2


def test_every_mlx_lm_lora_key_is_accepted(tmp_path):
    from mlx_lm import lora

    values = dict(lora.CONFIG_DEFAULTS)
    for action in lora.build_parser()._actions:
        if action.dest != "help":
            values.setdefault(action.dest, action.default)
    values.update(model="builtin:tiny-llama", data=str(DATA), train=True, num_layers=-1)
    path = tmp_path / "all.yaml"
    path.write_text(yaml.safe_dump(values))
    recipe = load_recipe(str(path))
    assert recipe.optimizer_config == values["optimizer_config"] and "muon" in recipe.optimizer_config
    assert recipe.warnings == []  # nothing set that is ignored


def test_ignored_mlx_lm_keys_warn_once_each(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(f"model: builtin:tiny-llama\ndata: {DATA}\nnum_layers: -1\nreport_to: wandb,swanlab\n"
                    "project_name: mine\nwandb: old-project\nconfig: lora.yaml\n")  # fmt: skip
    result = cli(path, "--check", "--out", tmp_path / "o")
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("mlx_flash.finetune: warning: ")]
    assert len(warnings) == 4
    for key in ("report_to: 'wandb,swanlab' is ignored", "project_name: 'mine' is ignored",
                "wandb: 'old-project' is ignored", "config: 'lora.yaml' is ignored"):  # fmt: skip
        assert sum(key in w for w in warnings) == 1, key


def test_resume_adapter_file_starts_from_those_weights(tmp_path):
    first = tmp_path / "first"
    assert main([str(QUICKSTART), *FAST, *ONE, "--out", str(first)]) == 0
    trained = first / "manual" / "adapters" / "adapters.safetensors"
    fresh, started = tmp_path / "fresh", tmp_path / "started"
    assert main([str(QUICKSTART), *FAST, *ONE, "--set", "iters=1", "--out", str(fresh)]) == 0
    assert main([str(QUICKSTART), *FAST, *ONE, "--set", "iters=1", "--set", f"resume_adapter_file={trained}",
                 "--out", str(started)]) == 0  # fmt: skip
    (from_scratch,) = read_records(fresh / "manual" / "metrics.jsonl")
    (from_trained,) = read_records(started / "manual" / "metrics.jsonl")
    # The same first batch; the trained adapters already fit it better.
    assert from_trained["tokens"] == from_scratch["tokens"]
    assert from_trained["loss"] < from_scratch["loss"] - 0.3


def test_clear_cache_threshold_reads_sizes_as_mlx_lm_does():
    assert parse_size(123, "k") == 123
    assert parse_size("2GB", "k") == parse_size("2G", "k") == 2 * 10**9 and parse_size("500M", "k") == 5 * 10**8
    assert parse_size("512 MiB", "k") == 512 * 2**20
    assert load_recipe(str(QUICKSTART), ["clear_cache_threshold=1.5k"]).clear_cache_threshold == 1500
    with pytest.raises(RecipeError, match="^clear_cache_threshold: expected a number of bytes"):
        load_recipe(str(QUICKSTART), ["clear_cache_threshold=lots"])


# Bad values that --check catches before anything loads.


@pytest.mark.parametrize(
    "setting, message",
    [
        ("learning_rate=0", "learning_rate: must be above 0, got 0.0"),
        ("learning_rate=-1e-4", "learning_rate: must be above 0, got -0.0001"),
        ("iters=0", "iters: must be at least 1, got 0"),
        ("iters=-3", "iters: must be at least 1, got -3"),
        ("num_layers=3", "num_layers: 3 but builtin:tiny-llama has only 2 layers"),
        ("train=false", "train: false asks mlx-lm to only evaluate"),
        ("val_batches=-2", "val_batches: must be -1 (the whole set), 0 (none) or more, got -2"),
        ("resume_adapter_file=nowhere.safetensors", "resume_adapter_file: no such file"),
        ("hf_dataset={name: billsum}", "hf_dataset: expected a mapping with the dataset's 'path'"),
    ],
)
def test_bad_values_are_caught_by_check(setting, message):
    result = cli(QUICKSTART, "--set", setting, "--check")
    assert result.returncode == 2
    assert message in one_error_line(result.stderr)


def test_hub_dataset_without_the_datasets_package_is_one_line(tmp_path):
    have_datasets = __import__("importlib").util.find_spec("datasets") is not None
    for setting, name in (("data=mlx-community/WikiSQL", "data: mlx-community/WikiSQL"),
                          ("hf_dataset={path: billsum}", "hf_dataset")):  # fmt: skip
        result = cli(QUICKSTART, "--set", setting, "--check", "--out", tmp_path)
        if have_datasets:
            assert result.returncode == 0, result.stderr
        else:
            assert result.returncode == 2
            line = one_error_line(result.stderr)
            assert f"{name} is a Hugging Face dataset, which needs the datasets package" in line


# Output and cache folders.


@pytest.fixture
def shared_tmp():
    """A folder every user can read (pytest's own tmp_path is root's alone)."""
    path = Path(tempfile.mkdtemp(prefix="mlx-flash-test-"))
    path.chmod(0o755)
    yield path
    for sub in path.rglob("*"):
        if sub.is_dir():
            sub.chmod(0o755)
    shutil.rmtree(path)


def _drop_root_override():
    # In the child, before exec: lose CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH
    # from the bounding set, so the command, even as root, obeys permission bits.
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    PR_CAPBSET_DROP, CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH = 24, 1, 2
    for cap in (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def unprivileged() -> dict:
    """``subprocess`` arguments under which a folder with mode 0o555 is unwritable:
    root writes anywhere whatever the mode, so as root the command runs
    without the capabilities that allow it."""
    return {"preexec_fn": _drop_root_override} if os.geteuid() == 0 else {}


def test_out_is_a_file(tmp_path):
    target = tmp_path / "results.txt"
    target.write_text("keep me\n")
    for extra in (["--check"], []):
        result = cli(QUICKSTART, *SMALL, *ONE, "--out", target, *extra)
        assert result.returncode == 2
        assert f"output.dir: {target} is a file, not a folder" in one_error_line(result.stderr)
    result = cli(QUICKSTART, *SMALL, *ONE, "--out", target / "below", "--check")
    assert f"output.dir: {target} is a file, not a folder" in one_error_line(result.stderr)
    assert target.read_text() == "keep me\n"


def test_read_only_output_folder(shared_tmp):
    out = shared_tmp / "out"
    out.mkdir()
    (out / "earlier.txt").write_text("keep me\n")
    out.chmod(0o555)
    env = dict(os.environ, MLX_FLASH_CACHE=str(shared_tmp / "cache"))
    for extra in (["--check"], []):
        result = cli(QUICKSTART, *SMALL, *ONE, "--out", out / "run", *extra, env=env, **unprivileged())
        assert result.returncode == 2, result.stderr
        line = one_error_line(result.stderr)
        assert f"output.dir: cannot write in {out} (" in line
    assert sorted(p.name for p in out.iterdir()) == ["earlier.txt"]


def test_read_only_model_cache(shared_tmp):
    cache_dir = shared_tmp / "cache"
    cache_dir.mkdir()
    cache_dir.chmod(0o555)
    (shared_tmp / "out").mkdir(mode=0o777)
    (shared_tmp / "out").chmod(0o777)
    env = dict(os.environ, MLX_FLASH_CACHE=str(cache_dir))
    for extra in (["--check"], []):
        result = cli(QUICKSTART, *SMALL, *ONE, "--out", shared_tmp / "out", *extra, env=env, **unprivileged())
        assert result.returncode == 2, result.stderr
        line = one_error_line(result.stderr)
        assert f"MLX_FLASH_CACHE: cannot write in {cache_dir} (" in line and "built there on first use" in line
    assert list(cache_dir.iterdir()) == []


# Data files: the file and line, always.


def data_folder(tmp_path, train: bytes, valid: bytes = None, test: bytes = None) -> Path:
    folder = tmp_path / "data"
    folder.mkdir()
    for name, content in (("train", train), ("valid", valid), ("test", test)):
        if content is not None:
            (folder / f"{name}.jsonl").write_bytes(content)
    return folder


GOOD = b"".join(b'{"text": "Q: %d plus 1? A: %d."}\n' % (i, i + 1) for i in range(12))


@pytest.mark.parametrize(
    "train, line",
    [
        (GOOD[:60] + b'{"text": "broken\n' + GOOD, 2),
        (GOOD + b"[1, 2]\n", 13),
        (GOOD + b'{"txt": "a"}\n', 13),
        (GOOD + b'{"text": 7}\n', 13),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00", 1),
        (GOOD + "{\"text\": \"caf\u00e9\"}\n".encode("latin-1"), 13),
    ],
    ids=["invalid json", "not an object", "other format", "wrong type", "binary", "latin-1"],
)
def test_bad_data_names_the_file_and_line(tmp_path, train, line):
    folder = data_folder(tmp_path, train, valid=GOOD)
    result = cli(QUICKSTART, *SMALL, *ONE, "--set", f"data={folder}", "--out", tmp_path / "out")
    assert result.returncode == 2
    error = one_error_line(result.stderr)
    assert f"data: {folder / 'train.jsonl'} line {line}: " in error
    assert not (tmp_path / "out").exists()  # nothing ran, nothing was written


def test_blank_lines_are_skipped(tmp_path):
    folder = data_folder(tmp_path, b"\n" + GOOD.replace(b"\n", b"\n\n", 3) + b"\n  \n", valid=GOOD)
    result = cli(QUICKSTART, *SMALL, *ONE, "--set", f"data={folder}", "--out", tmp_path / "out")
    assert result.returncode == 0, result.stderr


def test_missing_validation_set_is_one_warning_and_said_in_the_summary(tmp_path):
    folder = data_folder(tmp_path, GOOD)
    result = cli(QUICKSTART, *SMALL, *ONE, "--set", f"data={folder}", "--out", tmp_path / "out")
    assert result.returncode == 0, result.stderr
    warnings = [line for line in result.stderr.splitlines() if "warning" in line]
    assert warnings == [f"mlx_flash.finetune: warning: data: no {folder / 'valid.jsonl'}: training runs without validation"]
    summary = json.loads((tmp_path / "out" / "manual" / "summary.json").read_text())
    assert summary["validation"] == f"skipped: no validation data (no valid.jsonl in {folder})"
    assert summary["initial_val_loss"] is None and summary["final_val_loss"] is None
    assert "validation skipped: no validation data" in result.stderr


def test_test_set_required_when_test_is_true(tmp_path):
    folder = data_folder(tmp_path, GOOD, valid=GOOD)
    result = cli(QUICKSTART, "--set", f"data={folder}", "--set", "test=true", "--check")
    assert result.returncode == 2
    assert f"test: true but there is no {folder / 'test.jsonl'}" in one_error_line(result.stderr)


# The hub: a network that accepts connections and never answers.


@pytest.fixture
def silent_hub():
    """An HTTP endpoint that accepts every connection and never says a word."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    held = []
    stop = threading.Event()

    def accept():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    server.close()


def test_hub_model_behind_a_silent_network_times_out_with_a_way_forward(tmp_path, silent_hub):
    env = dict(os.environ, HF_ENDPOINT=silent_hub, HF_HUB_ETAG_TIMEOUT="1", HF_HOME=str(tmp_path / "hf"))
    started = time.time()
    result = cli(QUICKSTART, *SMALL, *ONE, "--set", "model=someone/some-model", "--out", tmp_path / "out",
                 env=env, timeout=120)  # fmt: skip
    assert time.time() - started < 60
    assert result.returncode == 2
    # Said before it waits, so a slow network is never silence.
    assert f"model someone/some-model: fetching from {silent_hub}" in result.stderr
    error = last_error_line(result.stderr)
    assert error.startswith("mlx_flash.finetune: error: model: cannot fetch someone/some-model from " + silent_hub)
    assert "no answer within 1 s" in error
    assert str(tmp_path / "hf" / "hub") in error and "--set model=/path/to/model" in error


def test_hub_model_offline_and_not_cached(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf"))
    result = cli(QUICKSTART, *SMALL, *ONE, "--set", "model=someone/some-model", "--out", tmp_path / "out", env=env)
    assert result.returncode == 2
    error = last_error_line(result.stderr)
    assert "offline mode (HF_HUB_OFFLINE) is on" in error and "--set model=/path/to/model" in error


# Reports: a missing plotting extra is said, not silent.


def test_missing_matplotlib_is_one_line_saying_how_to_get_plots(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` fails
    code = main([str(QUICKSTART), *SMALL, "--set", "attention.compare=[manual, blockwise]", "--out", str(tmp_path)])
    assert code == 0
    err = capsys.readouterr().err
    assert "no compare.png: plotting needs matplotlib (pip install 'mlx-flash-attention[plot]')" in err
    assert not (tmp_path / "compare.png").exists() and (tmp_path / "compare.md").exists()
