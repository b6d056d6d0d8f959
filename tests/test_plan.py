"""The memory planner: its predictions against measured steps, every form of
MODEL, budgets, bad input, and the fine-tune's and doctor's use of it."""

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from mlx.utils import tree_flatten

from mlx_flash.plan import fit, memory
from mlx_flash.plan.budget import parse_size
from mlx_flash.plan.cli import main
from mlx_flash.plan.models import PlanError, known_models, resolve

REPO = Path(__file__).resolve().parents[1]

#: The committed measurements the planner is held to: bench --step's cells,
#: and the planner's own measured cells (python -m mlx_flash.plan.measure).
MEASURED = [p for p in (REPO / "bench" / "linux-cpu-step" / "results.json", REPO / "bench" / "linux-cpu-plan" / "results.json") if p.is_file()]

#: Every committed cell's peak above the weights is predicted within 10%.
TOLERANCE = 0.10

KNOWN = ["tinyllama-1.1b", "qwen2.5-0.5b", "qwen2.5-1.5b", "qwen2.5-7b", "llama-3.2-1b", "llama-3.2-3b",
         "qwen3-8b", "mistral-7b", "gemma-3-1b", "gpt-oss-20b"]  # fmt: skip


def run(*args, env=None):
    """The command in a fresh interpreter: ``(exit status, stdout, stderr)``."""
    env = dict(os.environ if env is None else env, PYTHONPATH=str(REPO))
    result = subprocess.run(
        [sys.executable, "-m", "mlx_flash.plan", *map(str, args)],
        capture_output=True, text=True, cwd=tempfile.gettempdir(), env=env, timeout=120,
    )  # fmt: skip
    return result.returncode, result.stdout, result.stderr


def plan_json(capsys, *args) -> dict:
    assert main([*map(str, args), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def one_error(capsys, *args) -> str:
    assert main(list(map(str, args))) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("mlx_flash.plan: error: "), err
    return err[0]


# -- predictions against measurements ------------------------------------------


def test_measurements_are_committed():
    assert MEASURED, "no measured cells committed under bench/"
    cells = fit.load_cells(MEASURED)
    modes = {c["mode"] for c in cells}
    assert {"stock", "stock+ckpt", "fused"} <= modes
    assert len({c["model"] for c in cells}) >= 3


@pytest.mark.parametrize("path", MEASURED, ids=lambda p: p.parent.name)
def test_every_measured_peak_is_predicted_within_tolerance(path):
    cells = fit.load_cells([path])
    worst = []
    for cell, predicted, error in fit.errors(cells):
        if abs(error) > TOLERANCE:
            worst.append(f"{cell['model']} n={cell['layers']} L={cell['seq_len']} {cell['mode']}: {error:+.1%}")
    assert not worst, worst


@pytest.mark.parametrize("path", MEASURED, ids=lambda p: p.parent.name)
def test_weights_as_stored_match_the_measured_weights(path):
    for cell in fit.load_cells([path]):
        g, _, _ = fit.cell_case(cell)
        assert abs(g.weights_bytes / cell["weights_bytes"] - 1) < 0.02, (cell["model"], cell.get("quantized_bits"))


def test_the_fit_reproduces_the_committed_coefficients():
    """coefficients.json is what fit.py makes of the committed cells: a change
    to either that breaks their agreement shows here."""
    data = json.loads(fit.COEFFICIENTS_FILE.read_text())
    refit = fit.fit(fit.load_cells([REPO / p for p in data["fitted_from"]]))
    for family, values in data["coefficients"].items():
        for name, value in values.items():
            assert refit[family][name] == pytest.approx(value, abs=1e-3), (family, name)


# -- what the formulas must do, whatever the coefficients ----------------------


def test_flash_options_never_cost_more_and_stock_is_quadratic():
    g = resolve("qwen2.5-1.5b")
    peaks = {}
    for L in (4096, 8192):
        s = memory.Setup(seq=L)
        peaks[L] = {name: memory.predict(g, s, o).above_weights for name, o in memory.MODES.items()}
        assert peaks[L]["fused"] <= peaks[L]["stock"]
        assert peaks[L]["fused+loss"] <= peaks[L]["fused"]
        assert peaks[L]["all"] <= peaks[L]["fused+loss"]
    # Doubling L: dense scores grow 4x; with everything on the step stays about 2x.
    attention = [memory.predict(g, memory.Setup(seq=L), memory.MODES["stock"]).components["attention"] for L in (4096, 8192)]
    assert attention[1] / attention[0] == pytest.approx(4.0, rel=1e-6)
    assert peaks[8192]["stock"] / peaks[4096]["stock"] > peaks[8192]["fused"] / peaks[4096]["fused"]
    assert peaks[8192]["all"] / peaks[4096]["all"] < 2.3


def test_context_parallel_ranks_hold_less():
    g = resolve("qwen3-8b")
    one = memory.predict(g, memory.Setup(seq=65536), memory.MODES["all"]).above_weights
    four = memory.predict(g, memory.Setup(seq=65536, machines=4), memory.MODES["all"]).above_weights
    assert four < one / 2
    assert memory.max_length(g, memory.Setup(seq=1, machines=4), memory.MODES["all"], 24 << 30) > memory.max_length(
        g, memory.Setup(seq=1), memory.MODES["all"], 24 << 30
    )


def test_longest_row_is_the_last_that_fits():
    g = resolve("llama-3.2-1b")
    budget = 12 << 30
    for options in memory.MODES.values():
        n = memory.max_length(g, memory.Setup(seq=1), options, budget)
        assert n > 0
        assert memory.predict(g, memory.Setup(seq=n), options).peak <= budget
        assert memory.predict(g, memory.Setup(seq=n + 128), options).peak > budget


# -- every form of MODEL -------------------------------------------------------


def test_every_known_model_ships_a_config(capsys):
    assert set(KNOWN) <= set(known_models())
    for name in KNOWN:
        out = plan_json(capsys, name, "--memory", "64GB", "--seq", "4096")
        assert out["model"]["layers"] > 0 and set(out["modes"]) == set(memory.MODES)


def test_quantization_is_read_and_can_be_asked_for(capsys):
    q = plan_json(capsys, "qwen3-8b", "--memory", "32GB")["model"]
    assert (q["bits"], q["group_size"]) == (4, 64)
    # About 8.2e9 parameters at 4.5 bits (4 bits + a bfloat16 scale and bias per 64).
    assert 4.2e9 < q["weights_bytes"] < 5.0e9
    dense = plan_json(capsys, "qwen2.5-1.5b", "--memory", "32GB")["model"]
    assert dense["bits"] is None and 2.9e9 < dense["weights_bytes"] < 3.2e9  # 1.54e9 parameters in bfloat16
    four = plan_json(capsys, "qwen2.5-1.5b", "--memory", "32GB", "--bits", "4")["model"]
    assert four["bits"] == 4 and four["weights_bytes"] < dense["weights_bytes"] / 3


def test_config_file_and_folder(tmp_path, capsys):
    config = json.loads((REPO / "mlx_flash" / "configs" / "tinyllama-1.1b.json").read_text())
    config["num_hidden_layers"] = 3
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    by_file = plan_json(capsys, folder / "config.json", "--memory", "16GB")
    assert by_file["model"]["layers"] == 3
    # The folder's weights are what its safetensors files hold; they are not read.
    (folder / "model.safetensors").write_bytes(b"\0" * 123_456)
    by_folder = plan_json(capsys, folder, "--memory", "16GB")
    assert by_folder["model"]["weights_bytes"] == 123_456


def test_builtin_model(capsys):
    out = plan_json(capsys, "builtin:tiny-llama", "--memory", "1GB", "--seq", "512")
    assert out["model"]["hidden"] == 64 and out["model"]["dtype"] == "float32"


def test_gguf_file_reads_the_header_only(tmp_path, capsys):
    gguf_files = pytest.importorskip("gguf_files", reason="needs the test helpers' gguf package")
    from gguf import GGMLQuantizationType as T

    config = dict(gguf_files.TINY["llama"], tie_word_embeddings=False)
    model = gguf_files.tiny_model(config)
    tensors = gguf_files.gguf_tensors(model, config, permute=True)
    types = {name: T.Q4_0 for name in tensors if name.endswith("weight") and "norm" not in name}
    path = gguf_files.write(tmp_path / "tiny.gguf", "llama", config, tensors, types)
    out = plan_json(capsys, path, "--memory", "1GB", "--seq", "256")
    assert out["model"]["hidden"] == config["hidden_size"]
    # As gguf.load holds the model here: dequantized to float32 without a GPU.
    from mlx_flash.finetune import gguf

    loaded, _, _ = gguf.load(f"gguf:{path}")
    stored = sum(v.nbytes for _, v in tree_flatten(loaded.parameters()))
    assert out["model"]["bits"] == (None if gguf.dequantizes_by_default() else 4)
    assert abs(out["model"]["weights_bytes"] - stored) <= 0.02 * stored
    assert plan_json(capsys, f"gguf:{path}", "--memory", "1GB")["model"]["layers"] == config["num_hidden_layers"]


def test_recipe_gives_model_rows_and_batch(capsys):
    out = plan_json(capsys, REPO / "recipes" / "qwen2.5-1.5b-lora.yaml", "--memory", "16GB")
    assert out["model"]["hidden"] == 1536  # Qwen/Qwen2.5-1.5B-Instruct: the shipped config
    assert out["setup"] == {"seq_len": 2048, "batch": 2, "lora_layers": 16, "lora_rank": 8, "machines": 1}


def test_the_plan_loads_no_weights_and_is_quick(capsys):
    from mlx_flash.plan.cli import build_parser, plan_from_args

    tic = time.perf_counter()
    plan_from_args(build_parser().parse_args([str(REPO / "recipes" / "qwen2.5-1.5b-lora.yaml"), "--memory", "16GB"]))
    assert time.perf_counter() - tic < 2.0


# -- budgets -------------------------------------------------------------------


def test_sizes():
    assert parse_size("16GB") == parse_size("16G") == 16 * 10**9
    assert parse_size("16GiB") == 16 << 30
    assert parse_size("16000MB") == 16 * 10**9


def test_a_budget_too_small(capsys):
    out = plan_json(capsys, "qwen2.5-7b", "--memory", "2GB", "--seq", "1024")
    assert all(not m["fits"] and m["max_seq_len"] == 0 for m in out["modes"].values())
    assert main(["qwen2.5-7b", "--memory", "2GB"]) == 0
    assert "NO" in capsys.readouterr().out


def test_more_memory_longer_rows(capsys):
    small = plan_json(capsys, "qwen2.5-1.5b", "--mac", "16")["modes"]
    large = plan_json(capsys, "qwen2.5-1.5b", "--mac", "32")["modes"]
    assert all(large[m]["max_seq_len"] > small[m]["max_seq_len"] for m in small)


# -- bad input: one line, exit 2 -----------------------------------------------


def test_unknown_model(capsys):
    assert "unknown model 'qwen9-1t'" in one_error(capsys, "qwen9-1t")


def test_malformed_configs(tmp_path, capsys):
    bad = tmp_path / "config.json"
    bad.write_text("{not json")
    assert "not valid JSON" in one_error(capsys, bad)
    bad.write_text(json.dumps({"model_type": "llama", "num_attention_heads": 4}))
    assert "hidden_size" in one_error(capsys, bad)
    bad.write_text(json.dumps({"model_type": "llama", "hidden_size": -64, "num_attention_heads": 4}))
    assert "hidden_size" in one_error(capsys, bad)


def test_negative_length_and_unparsable_size(capsys):
    assert "--seq" in one_error(capsys, "qwen2.5-1.5b", "--seq", "-5")
    assert "--batch" in one_error(capsys, "qwen2.5-1.5b", "--batch", "0")
    assert "--memory" in one_error(capsys, "qwen2.5-1.5b", "--memory", "lots")
    assert "--memory" in one_error(capsys, "qwen2.5-1.5b", "--memory", "16 furlongs")


def test_bad_input_from_the_command_line():
    code, out, err = run("no-such-model", "--memory", "16GB")
    assert code == 2 and out == "" and len(err.strip().splitlines()) == 1 and "Traceback" not in err


# -- the fine-tune and the doctor ----------------------------------------------


def _finetune(tmp_path, *args, env=None):
    env = dict(os.environ, PYTHONPATH=str(REPO), MLX_FLASH_CACHE=str(tmp_path / "cache"), **(env or {}))
    return subprocess.run(
        [sys.executable, "-m", "mlx_flash.finetune", str(REPO / "recipes" / "quickstart.yaml"),
         "--out", str(tmp_path / "run"), "--set", "attention.compare=[]", "--set", "attention.variant=manual",
         "--set", "iters=2", "--set", "max_seq_length=64", "--set", "val_batches=1", "--set", "steps_per_eval=2",
         *args],
        capture_output=True, text=True, cwd=tempfile.gettempdir(), env=env, timeout=300,
    )  # fmt: skip


def test_finetune_refuses_a_run_that_would_not_fit_before_loading(tmp_path):
    result = _finetune(tmp_path, env={"MLX_FLASH_MEMORY": "2MB"})
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert any(line.startswith("plan: needs") for line in lines)
    error = lines[-1]
    assert error.startswith("mlx_flash.finetune: error: plan: this run needs") and "--force" in error
    assert "cheapest change" in error or "larger machine" in error
    assert not (tmp_path / "cache" / "builtin").exists()  # the built-in model was never built or loaded


def test_finetune_records_the_planned_peak(tmp_path):
    result = _finetune(tmp_path, "--force", env={"MLX_FLASH_MEMORY": "2MB"})
    assert result.returncode == 0, result.stderr
    assert "plan: --force" in result.stderr
    summary = json.loads((tmp_path / "run" / "manual" / "summary.json").read_text())
    assert summary["planned_peak_bytes"] > 0 and summary["peak_memory_bytes"] > 0


def test_doctor_prints_the_longest_row_for_a_recipe():
    result = subprocess.run(
        [sys.executable, "-m", "mlx_flash.doctor", "--plan", "--recipe", str(REPO / "recipes" / "qwen2.5-1.5b-lora.yaml")],
        capture_output=True, text=True, cwd=tempfile.gettempdir(), env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "longest row that fits" in result.stdout and "qwen2.5-1.5b" in result.stdout
