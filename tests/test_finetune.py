"""python -m mlx_flash.finetune: recipes, training, metrics, reports, bad input.

Training runs use the built-in tiny llama and the shipped data set at a few
iterations; the real recipes are exercised with their real attention
geometry at one layer and a byte vocabulary, built here from random weights.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

import mlx_flash
from mlx_flash.finetune import builtin, report
from mlx_flash.finetune.__main__ import main
from mlx_flash.finetune.config import RecipeError, load_recipe

from finetune_runs import FAST, QUICKSTART, REPO, cache, cli, read_records  # noqa: F401 - cache is a fixture

RECORD_KEYS = {"iteration", "loss", "tokens", "wall_s", "tokens_per_s", "peak_memory_bytes", "learning_rate"}


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory):
    """The quickstart recipe, trained 8 iterations each with manual and practical."""
    out = tmp_path_factory.mktemp("quickstart")
    code = main([str(QUICKSTART), *FAST, "--set", "attention.compare=[manual, practical]", "--out", str(out)])
    assert code == 0
    return out


def test_quickstart_loss_falls(quickstart):
    for variant in ("manual", "practical"):
        records = read_records(quickstart / variant / "metrics.jsonl")
        losses = [r["loss"] for r in records]
        assert np.mean(losses[-3:]) < np.mean(losses[:2]) - 0.3
        summary = json.loads((quickstart / variant / "summary.json").read_text())
        assert summary["final_val_loss"] < summary["initial_val_loss"]


def test_metrics_one_valid_record_per_iteration(quickstart):
    records = read_records(quickstart / "manual" / "metrics.jsonl")
    assert [r["iteration"] for r in records] == list(range(1, 9))
    for r in records:
        assert RECORD_KEYS <= set(r)
        assert math.isfinite(r["loss"]) and r["loss"] > 0
        assert isinstance(r["tokens"], int) and r["tokens"] > 0
        assert r["wall_s"] > 0
        assert r["tokens_per_s"] == pytest.approx(r["tokens"] / r["wall_s"], rel=1e-6)
        assert r["peak_memory_bytes"] > 0
        assert r["learning_rate"] == pytest.approx(3e-3, rel=1e-6)
        assert r["variant"] == "manual"
    # Validation ran where steps_per_eval says, and only there.
    assert [r["iteration"] for r in records if "val_loss" in r] == [4, 8]

    summary = json.loads((quickstart / "manual" / "summary.json").read_text())
    steady = [r["wall_s"] for r in records[1:]]
    assert summary["iterations"] == 8 and not summary["interrupted"]
    assert summary["median_iteration_s"] == pytest.approx(np.median(steady))
    assert summary["p95_iteration_s"] == pytest.approx(np.percentile(steady, 95))
    assert summary["peak_memory_bytes"] == max(r["peak_memory_bytes"] for r in records)
    assert summary["final_val_loss"] == records[-1]["val_loss"]


def test_summary_names_the_implementation_that_ran(quickstart):
    # The tiny llama's geometry: 4 query heads, 2 KV heads, head dim 16.
    q = mx.zeros((4, 4, 32, 16))
    kv = mx.zeros((4, 2, 32, 16))
    for variant in ("manual", "practical"):
        summary = json.loads((quickstart / variant / "summary.json").read_text())
        plan = mlx_flash.explain(q, kv, kv, mask="causal", variant=variant)
        assert (summary["implementation"], summary["backend"]) == (plan.implementation, plan.backend)


def test_compare_table_has_one_row_per_variant(quickstart):
    table = json.loads((quickstart / "compare.json").read_text())
    assert [row["variant"] for row in table["rows"]] == ["manual", "practical"]
    manual, practical = table["rows"]
    assert manual["speedup_vs_manual"] == pytest.approx(1.0)
    assert practical["speedup_vs_manual"] == pytest.approx(
        manual["median_iteration_s"] / practical["median_iteration_s"]
    )
    markdown = (quickstart / "compare.md").read_text()
    body = [line for line in markdown.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(body) == 3  # header + one row per variant
    assert body[1].startswith("| manual |") and body[2].startswith("| practical |")
    has_matplotlib = __import__("importlib").util.find_spec("matplotlib") is not None
    assert (quickstart / "compare.png").exists() == has_matplotlib


def test_same_start_for_every_variant(quickstart):
    # Same seed, weights and batch: the loss before the first update agrees.
    first = [read_records(quickstart / v / "metrics.jsonl")[0] for v in ("manual", "practical")]
    assert first[0]["tokens"] == first[1]["tokens"]
    assert first[0]["loss"] == pytest.approx(first[1]["loss"], rel=1e-4)


def test_adapters_load_in_mlx_lm_and_change_output(quickstart):
    from mlx_lm import load

    adapters = quickstart / "manual" / "adapters"
    config = json.loads((adapters / "adapter_config.json").read_text())
    assert config["fine_tune_type"] == "lora" and config["num_layers"] == -1
    assert sorted(p.name for p in adapters.glob("*.safetensors")) == [
        "0000004_adapters.safetensors",
        "0000008_adapters.safetensors",
        "adapters.safetensors",
    ]
    base, tokenizer = load(config["model"])
    tuned, _ = load(config["model"], adapter_path=str(adapters))
    tokens = mx.array([tokenizer.encode("Q: What is 2 plus 3? A:")])
    before, after = base(tokens), tuned(tokens)
    assert before.shape == after.shape
    assert mx.max(mx.abs(before - after)).item() > 1e-2


def test_progress_bar_on_stderr(tmp_path, capsys):
    assert main([str(QUICKSTART), *FAST, "--set", "iters=2", "--set", "attention.compare=[]",
                 "--set", "attention.variant=blockwise", "--out", str(tmp_path)]) == 0  # fmt: skip
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("[blockwise] ")]
    assert any(" 2/2 " in line and "loss " in line and "it/s" in line for line in lines)
    # A single variant writes no comparison.
    assert (tmp_path / "blockwise" / "adapters" / "adapters.safetensors").exists()
    assert not (tmp_path / "compare.json").exists()


def test_existing_adapters_need_overwrite_or_resume(quickstart, capsys):
    before = (quickstart / "manual" / "metrics.jsonl").read_text()
    code = main([str(QUICKSTART), *FAST, "--set", "attention.compare=[manual, practical]", "--out", str(quickstart)])
    assert code == 2
    err = capsys.readouterr().err.strip()
    assert "already holds adapters" in err and "--overwrite" in err and len(err.splitlines()) == 1
    assert (quickstart / "manual" / "metrics.jsonl").read_text() == before


# The real recipes: they validate, and their attention geometry trains.

REAL = {
    "tinyllama-1.1b-lora": (
        "TinyLlama/TinyLlama-1.1B-Chat-v1.0",
        {"model_type": "llama", "hidden_size": 2048, "num_attention_heads": 32, "num_key_value_heads": 4},
    ),
    "qwen2.5-1.5b-lora": (
        "Qwen/Qwen2.5-1.5B-Instruct",
        {"model_type": "qwen2", "hidden_size": 1536, "num_attention_heads": 12, "num_key_value_heads": 2},
    ),
}


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_recipe_validates(name):
    recipe = load_recipe(str(REPO / "recipes" / f"{name}.yaml"))
    assert recipe.model == REAL[name][0]
    assert recipe.iters == 100
    assert recipe.variants == ["mlx:padded", "manual", "mlx", "practical", "demo"]
    assert Path(recipe.data) == REPO / "recipes" / "data"
    # Long rows, so that attention is a real share of each step.
    assert recipe.pack_sequences and recipe.max_seq_length == 2048
    result = cli(REPO / "recipes" / f"{name}.yaml", "--check")
    assert result.returncode == 0, result.stderr
    assert f"model: {REAL[name][0]}" in result.stdout


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_geometry_trains_one_step(name, tmp_path):
    geometry = REAL[name][1]
    config = dict(
        geometry,
        num_hidden_layers=1,
        intermediate_size=128,
        vocab_size=builtin.BYTE_VOCAB_SIZE,
        rms_norm_eps=1e-6,
        rope_theta=10000.0,
        tie_word_embeddings=False,
    )
    model = builtin.write_model(tmp_path / "model", config)
    weights = mx.load(str(model / "model.safetensors"))
    assert ("model.layers.0.self_attn.q_proj.bias" in weights) == (name.startswith("qwen"))

    out = tmp_path / "out"
    code = main([str(REPO / "recipes" / f"{name}.yaml"), "--set", f"model={model}", "--set", "iters=1",
                 "--set", "num_layers=1", "--set", "batch_size=2", "--set", "max_seq_length=48",
                 "--set", "val_batches=0", "--set", "attention.compare=[manual, mlx, practical, demo]",
                 "--out", str(out)])  # fmt: skip
    assert code == 0
    head_dim = geometry["hidden_size"] // geometry["num_attention_heads"]
    first = []
    for variant in ("manual", "mlx", "practical", "demo"):
        (record,) = read_records(out / variant / "metrics.jsonl")
        assert math.isfinite(record["loss"])
        # Packed: 2 rows of 48 tokens holding whole examples; a target counts
        # only inside its example, so each row's first token of every example
        # (at least one per row) is no target, nor is padding.
        real = round(record["fill"] * 2 * 48)
        assert 0 < record["tokens"] <= real - 2
        first.append(record["loss"])
        adapters = mx.load(str(out / variant / "adapters" / "adapters.safetensors"))
        rank = 8
        assert adapters["model.layers.0.self_attn.k_proj.lora_b"].shape == (
            rank,
            geometry["num_key_value_heads"] * head_dim,
        )
        assert adapters["model.layers.0.self_attn.q_proj.lora_a"].shape == (geometry["hidden_size"], rank)
    for loss in first[1:]:
        assert loss == pytest.approx(first[0], rel=1e-4)
    rows = json.loads((out / "compare.json").read_text())["rows"]
    assert [r["variant"] for r in rows] == ["manual", "mlx", "practical", "demo"]
    assert rows[1]["speedup_vs_mlx"] == pytest.approx(1.0)
    assert "against `mlx`" in (out / "compare.md").read_text()


# Recipes: overrides and paths.


def test_set_overrides_are_typed_and_dotted(tmp_path):
    recipe = load_recipe(
        str(QUICKSTART),
        ["lora_parameters.rank=16", "learning_rate=1e-4", "attention.compare=[manual, demo]", "grad_checkpoint=true"],
    )
    assert recipe.lora_parameters["rank"] == 16 and recipe.lora_parameters["scale"] == 20.0
    assert recipe.learning_rate == 1e-4 and isinstance(recipe.learning_rate, float)
    assert recipe.variants == ["manual", "demo"]
    assert recipe.grad_checkpoint is True
    assert load_recipe(str(QUICKSTART), out=str(tmp_path / "x")).output["dir"] == str(tmp_path / "x")


def test_paths_resolve_against_the_recipe_file(tmp_path, monkeypatch):
    data = tmp_path / "recipes" / "mydata"
    data.mkdir(parents=True)
    (data / "train.jsonl").write_text('{"text": "a"}\n')
    path = tmp_path / "recipes" / "r.yaml"
    path.write_text("model: builtin:tiny-llama\ndata: mydata\nnum_layers: 2\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    recipe = load_recipe(str(path))
    assert recipe.data == str(data)
    assert recipe.output["dir"] == str(elsewhere / "runs" / "r")
    # A --set path is a command-line path: relative to the working directory.
    with pytest.raises(RecipeError, match="no such data folder .*elsewhere/mydata"):
        load_recipe(str(path), ["data=mydata"])


def test_shipped_recipes_found_by_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert Path(load_recipe("quickstart").recipe).name == "quickstart.yaml"
    assert Path(load_recipe("recipes/qwen2.5-1.5b-lora.yaml").recipe).name == "qwen2.5-1.5b-lora.yaml"


# Bad input: one line naming the key or file, exit status 2, no traceback.

BAD_RECIPES = {
    "unknown key": ("model: builtin:tiny-llama\ndata: DATA\nbatch_sise: 4\n", "unknown key 'batch_sise' (did you mean 'batch_size'?)"),
    "unknown nested key": ("model: builtin:tiny-llama\ndata: DATA\nlora_parameters: {rnak: 4}\n", "'lora_parameters.rnak' (did you mean 'lora_parameters.rank'?)"),
    "wrong type": ("model: builtin:tiny-llama\ndata: DATA\niters: ten\n", "iters: expected an integer, got 'ten'"),
    "missing model": ("model: ./no-such-model\ndata: DATA\n", "model: no such model folder"),
    "unknown variant": ("model: builtin:tiny-llama\ndata: DATA\nattention: {variant: fastest}\n", "attention.variant: unknown variant 'fastest'"),
    "unknown compare variant": ("model: builtin:tiny-llama\ndata: DATA\nattention: {compare: [manual, dmeo]}\n", "did you mean 'demo'?"),
    "unreadable yaml": ("model: builtin:tiny-llama\ndata: [unclosed\n", "cannot parse YAML"),
    "missing data file": ("model: builtin:tiny-llama\ndata: EMPTY\n", "missing data file"),
}  # fmt: skip


@pytest.mark.parametrize("case", sorted(BAD_RECIPES))
def test_bad_recipe_exits_2(case, tmp_path):
    text, message = BAD_RECIPES[case]
    (tmp_path / "empty").mkdir()
    text = text.replace("DATA", str(REPO / "recipes" / "data")).replace("EMPTY", str(tmp_path / "empty"))
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    result = cli(path, "--check")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    if case in ("unreadable yaml", "missing data file"):
        assert str(path if case == "unreadable yaml" else tmp_path / "empty") in lines[0]


@pytest.mark.parametrize(
    "args, message",
    [
        (["no-such-recipe.yaml"], "recipe file not found: no-such-recipe.yaml"),
        ([QUICKSTART, "--set", "num_layers=0"], "num_layers: must be -1 (every layer) or at least 1, got 0"),
        ([QUICKSTART, "--set", "num_layers=-5"], "num_layers: must be -1 (every layer) or at least 1, got -5"),
        ([QUICKSTART, "--set", "lr_schedule.name=cosine_decay"], "'lr_schedule' is set as a whole mapping, e.g. --set"),
        ([QUICKSTART, "--set", "lr_schedule={name: bogus, arguments: [1e-5]}"], "lr_schedule.name: unknown schedule 'bogus'"),
        ([QUICKSTART, "--set", "lr_schedule={name: cosine_decay, arguments: [1e-5, 10, 0, 1]}"], "lr_schedule: cannot build cosine_decay"),
        ([QUICKSTART, "--set", "optimizer_config={adamw: {weight_decy: 0.1}}"], "optimizer_config.adamw: "),
        ([QUICKSTART, "--set", "optimizer_config={adamx: {}}"], "unknown key 'optimizer_config.adamx'"),
        ([QUICKSTART, "--set", "attention.compare=[mlx:fast]"], "attention.compare[0]: unknown option ':fast'"),
        ([QUICKSTART, "--set", "iters"], "--set 'iters': expected KEY=VALUE"),
        ([QUICKSTART, "--set", "model=/no/such/model"], "model: no such model folder /no/such/model"),
        ([QUICKSTART, "--set", "attention.variant=turbo"], "attention.variant: unknown variant 'turbo'"),
        ([QUICKSTART, "--set", "batch_size=true"], "batch_size: expected an integer, got True"),
    ],
)
def test_bad_command_line_exits_2(args, message):
    result = cli(*args, "--check")
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr


# The built-in model and the comparison table.


def test_builtin_model_is_deterministic_and_cached(tmp_path, monkeypatch):
    paths = []
    for name in ("a", "b"):
        monkeypatch.setenv("MLX_FLASH_CACHE", str(tmp_path / name))
        paths.append(builtin.ensure("builtin:tiny-llama"))
    first, second = (mx.load(str(p / "model.safetensors")) for p in paths)
    assert first.keys() == second.keys()
    assert all(mx.array_equal(first[k], second[k]).item() for k in first)
    stamp = (paths[1] / "model.safetensors").stat().st_mtime_ns
    assert builtin.ensure("builtin:tiny-llama") == paths[1]
    assert (paths[1] / "model.safetensors").stat().st_mtime_ns == stamp

    from mlx_lm.utils import load_tokenizer

    tokenizer = load_tokenizer(paths[0])
    text = "Q: What is 7 plus 5? A: 12. ünïcode"
    ids = tokenizer.encode(text)
    assert len(ids) == len(text.encode("utf-8"))
    assert tokenizer.decode(ids) == text
    assert tokenizer.eos_token_id == 2


def _summary(variant, median, peak):
    return {
        "variant": variant, "implementation": variant, "backend": "mlx ops", "iterations": 3,
        "median_iteration_s": median, "p95_iteration_s": median, "tokens_per_s": 1.0,
        "peak_memory_bytes": peak, "final_train_loss": 1.0, "train_loss_last10": 1.1, "final_val_loss": None,
    }  # fmt: skip


def test_compare_rows_speedup_against_manual():
    rows = report.rows([_summary("manual", 0.3, 400), _summary("demo", 0.1, 100)])
    assert rows[0]["speedup_vs_manual"] == pytest.approx(1.0)
    assert rows[1]["speedup_vs_manual"] == pytest.approx(3.0)
    assert rows[1]["memory_vs_manual"] == pytest.approx(0.25)
    # No manual run: no speedup is invented.
    rows = report.rows([_summary("practical", 0.2, 100), _summary("demo", 0.1, 100)])
    assert [r["speedup_vs_manual"] for r in rows] == [None, None]


def test_data_parallel_under_mlx_launch(quickstart, tmp_path):
    # Two local ranks split each batch: the same tokens and (nearly) the same
    # loss as one process, gradients averaged, one copy of the metrics.
    launcher = Path(sys.executable).parent / "mlx.launch"
    out = tmp_path / "dp"
    result = subprocess.run(
        [str(launcher), "-n", "2", "--backend", "ring", "--", sys.executable, "-m", "mlx_flash.finetune",
         str(QUICKSTART), *FAST, "--set", "iters=2", "--set", "attention.compare=[manual]", "--out", str(out)],
        capture_output=True, text=True, cwd=tmp_path, timeout=240,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    records = read_records(out / "manual" / "metrics.jsonl")
    single = read_records(quickstart / "manual" / "metrics.jsonl")[:2]
    assert [r["iteration"] for r in records] == [1, 2]
    assert [r["tokens"] for r in records] == [r["tokens"] for r in single]
    for r, s in zip(records, single):
        assert r["loss"] == pytest.approx(s["loss"], rel=1e-2)
    assert json.loads((out / "manual" / "summary.json").read_text())["rank_count"] == 2


# Problems a new user ran into, each fixed.


def test_optimizer_config_is_a_free_mapping_built_by_mlx():
    from mlx_flash.finetune import train

    recipe = load_recipe(str(QUICKSTART), ["optimizer=adamw", "optimizer_config={adamw: {weight_decay: 0.03}}"])
    optimizer = train.build_optimizer(recipe)
    assert type(optimizer).__name__ == "AdamW" and optimizer.weight_decay == pytest.approx(0.03)
    # Options for an optimizer not in use are checked too, and kept.
    recipe = load_recipe(str(QUICKSTART), ["optimizer_config={sgd: {momentum: 0.5}}"])
    assert recipe.optimizer_config == {"sgd": {"momentum": 0.5}}
    with pytest.raises(RecipeError, match=r"^optimizer_config\.sgd: .*momentun"):
        load_recipe(str(QUICKSTART), ["optimizer_config={sgd: {momentun: 0.5}}"])


def test_lr_schedule_is_built_as_mlx_lm_does():
    from mlx_flash.finetune import train

    recipe = load_recipe(str(QUICKSTART), ["lr_schedule={name: cosine_decay, arguments: [1.0e-3, 100], warmup: 10}"])
    schedule = train.build_optimizer(recipe)._schedulers["learning_rate"]
    # Linear warm-up from 0 over 10 steps, then the cosine from 1e-3.
    assert schedule(0).item() == pytest.approx(0.0)
    assert schedule(5).item() == pytest.approx(0.5e-3)
    assert schedule(10).item() == pytest.approx(1e-3)


def test_a_missing_path_is_not_replaced_by_a_shipped_recipe(tmp_path, monkeypatch):
    from importlib.resources import files

    monkeypatch.chdir(tmp_path)
    # Bare names fall back to the shipped recipe...
    assert Path(load_recipe("quickstart.yaml").recipe) == Path(str(files("mlx_flash.recipes"))) / "quickstart.yaml"
    # ...a path with a folder part means that file only.
    for name in ("./quickstart.yaml", "foo/quickstart.yaml", "./recipes/quickstart.yaml", "recipes/quickstart",
                 str(tmp_path / "quickstart.yaml"), "nonesuch"):
        with pytest.raises(RecipeError, match=f"^recipe file not found: {name}$"):
            load_recipe(name)
    # A file of that name here wins over the shipped one.
    (tmp_path / "quickstart.yaml").write_text(f"model: builtin:tiny-llama\ndata: {REPO / 'recipes' / 'data'}\niters: 3\nnum_layers: -1\n")
    assert load_recipe("quickstart.yaml").iters == 3


def test_check_prints_each_variants_adapter_folder(tmp_path):
    shared = tmp_path / "shared-adapters"
    result = cli(QUICKSTART, "--check", "--set", f"adapter_path={shared}", "--out", tmp_path / "o")
    assert result.returncode == 0, result.stderr
    # A ":padded" entry runs in a folder of its own name, with ":" spelled "-".
    for variant, folder in (("mlx:padded", "mlx-padded"), ("mlx", "mlx"), ("blockwise", "blockwise")):
        assert f"# {variant}: metrics in {tmp_path / 'o' / folder}, adapters in {shared / folder}" in result.stdout


def _data(tmp_path, train, valid=None):
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text(train)
    if valid is not None:
        (data / "valid.jsonl").write_text(valid)
    return data


@pytest.mark.parametrize(
    "train, valid, message",
    [
        ("", None, "train.jsonl is empty"),
        ("\n  \n", None, "train.jsonl is empty"),
        ('{"text": "a"}\n' * 8, "", "valid.jsonl is empty"),
        ('{"words": "a"}\n' * 8, None, "train.jsonl line 1: unsupported data format (keys: words); expected 'text'"),
    ],
)
def test_bad_data_gives_one_line(tmp_path, capsys, train, valid, message):
    data = _data(tmp_path, train, valid)
    code = main([str(QUICKSTART), *FAST, "--set", f"data={data}", "--set", "attention.compare=[manual]",
                 "--out", str(tmp_path / "out")])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and err[-1].startswith("mlx_flash.finetune: error: data: ")


def test_lora_keys_matching_nothing_is_a_recipe_error(tmp_path, capsys):
    code = main([str(QUICKSTART), *FAST, "--set", "lora_parameters.keys=[foo]", "--set", "attention.compare=[manual]",
                 "--out", str(tmp_path)])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "lora_parameters.keys: no layer matches ['foo']" in err and "self_attn.q_proj" in err


def test_progress_clock_starts_after_initial_validation_and_checkpointing_is_undone(tmp_path, monkeypatch):
    import mlx_lm.tuner.trainer as trainer
    from mlx_lm.models.llama import TransformerBlock

    from mlx_flash.finetune import train

    events = []
    evaluate = trainer.evaluate

    def recording_evaluate(*args, **kwargs):
        events.append("validate")
        return evaluate(*args, **kwargs)

    class RecordingProgress(train.Progress):
        def __init__(self, *args, **kwargs):
            events.append("progress")
            super().__init__(*args, **kwargs)

    monkeypatch.setattr(trainer, "evaluate", recording_evaluate)
    monkeypatch.setattr(train, "Progress", RecordingProgress)
    original = TransformerBlock.__call__
    code = main([str(QUICKSTART), *FAST, "--set", "iters=1", "--set", "grad_checkpoint=true",
                 "--set", "attention.compare=[]", "--set", "attention.variant=manual", "--out", str(tmp_path)])  # fmt: skip
    assert code == 0
    assert events[:2] == ["validate", "progress"]
    # mlx-lm's grad_checkpoint replaces the class's __call__; the run puts it back.
    assert TransformerBlock.__call__ is original


def test_grad_checkpointing_is_scoped(tmp_path):
    from mlx_lm.models.llama import TransformerBlock

    from mlx_flash.finetune import train

    original = TransformerBlock.__call__
    layer = TransformerBlock.__new__(TransformerBlock)
    with train.grad_checkpointing(layer):
        assert TransformerBlock.__call__ is not original
    assert TransformerBlock.__call__ is original
    with pytest.raises(RuntimeError):
        with train.grad_checkpointing(layer):
            raise RuntimeError("a failed run")
    assert TransformerBlock.__call__ is original


def test_ctrl_c_outside_the_training_loop_exits_130(tmp_path, monkeypatch, capsys):
    from mlx_flash.finetune import train

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train, "run", interrupted)
    code = main([str(QUICKSTART), *FAST, "--out", str(tmp_path)])
    assert code == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and "Ctrl-C: stopped during the mlx:padded run" in err


def test_final_loss_is_the_last_iteration_and_last10_is_labelled(quickstart):
    records = read_records(quickstart / "manual" / "metrics.jsonl")
    summary = json.loads((quickstart / "manual" / "summary.json").read_text())
    assert summary["final_train_loss"] == records[-1]["loss"]
    assert summary["train_loss_last10"] == pytest.approx(np.mean([r["loss"] for r in records[-10:]]))
    markdown = (quickstart / "compare.md").read_text()
    assert "| train loss, last it | train loss, mean of last 10 its |" in markdown
    assert f"| {summary['final_train_loss']:.3f} | {summary['train_loss_last10']:.3f} |" in markdown


def test_compare_names_the_hardware(quickstart):
    from mlx_flash.machine import describe

    machine = describe()
    markdown = (quickstart / "compare.md").read_text()
    assert f"Hardware: {machine['chip']} ({machine['cpu_cores']} CPU cores" in markdown
    assert json.loads((quickstart / "compare.json").read_text())["machine"]["chip"] == machine["chip"]


def test_atomic_writes_sync_and_leave_nothing_behind(tmp_path, monkeypatch):
    from mlx_flash.finetune import files

    synced = []
    fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), fsync(fd)))
    files.write_text(tmp_path / "a.txt", "text")
    files.write_bytes(tmp_path / "b.bin", b"\x00\x01")
    files.write_safetensors(tmp_path / "c.safetensors", {"w": mx.arange(3)})
    assert len(synced) == 3
    assert (tmp_path / "a.txt").read_text() == "text" and (tmp_path / "b.bin").read_bytes() == b"\x00\x01"
    assert mx.load(str(tmp_path / "c.safetensors"))["w"].tolist() == [0, 1, 2]
    # A failed write leaves the old file as it was and no temporary file.
    with pytest.raises(TypeError):
        files.write_text(tmp_path / "a.txt", None)
    assert (tmp_path / "a.txt").read_text() == "text"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.bin", "c.safetensors"]



# ---- packed rows with document masks ------------------------------------------


def test_packed_and_padded_runs_side_by_side(tmp_path):
    """The quickstart's comparison: stock mlx-lm's padded batches next to
    packed rows with fused document masks; the packed run proves itself
    exact (a validation document's loss packed equals its loss alone)."""
    out = tmp_path / "out"
    code = main([str(QUICKSTART), *FAST, "--set", "max_seq_length=256",
                 "--set", "attention.compare=[mlx:padded, blockwise]", "--out", str(out)])  # fmt: skip
    assert code == 0
    padded = json.loads((out / "mlx-padded" / "summary.json").read_text())
    packed = json.loads((out / "blockwise" / "summary.json").read_text())
    assert (padded["packed"], packed["packed"]) == (False, True)
    assert padded["attention_variant"] == "mlx" and padded["variant"] == "mlx:padded"
    # Padded rows carry padding; packed rows are nearly full.
    assert padded["fill_ratio"] < 0.9 < packed["fill_ratio"] <= 1.0
    assert packed["packing"]["examples"] == 320 and packed["packing"]["truncated_examples"] == 0
    # Summed losses of documents up to 256 tokens (hundreds of nats): float32
    # rounding reaches a few 1e-6 of that, and where within it depends on the
    # BLAS's blocking (1.3e-3 seen with single-threaded OpenBLAS); test_packing
    # holds the packed loss to 1e-4 on a small model.
    assert packed["packing"]["max_document_loss_difference"] < 5e-3
    assert "segments" in packed["attention_plan"] and "no Lq x Lk mask" in packed["attention_plan"]
    for record in read_records(out / "blockwise" / "metrics.jsonl"):
        assert 0 < record["tokens"] < 4 * 256 and record["fill"] > 0.9
    markdown = (out / "compare.md").read_text()
    assert "real tokens/s vs mlx:padded" in markdown
    rows = {r["variant"]: r for r in json.loads((out / "compare.json").read_text())["rows"]}
    assert rows["blockwise"]["tokens_vs_mlx"] == pytest.approx(packed["tokens_per_s"] / padded["tokens_per_s"])
    # Iteration time is compared only between runs on the same kind of rows.
    assert rows["blockwise"]["speedup_vs_mlx"] is None


def test_packed_rows_mask_the_prompt(tmp_path):
    # Completions data goes through the tokenizer's chat template: give the
    # byte tokenizer a plain one.
    model = builtin.write_model(tmp_path / "model", builtin.MODELS["tiny-llama"])
    config_path = model / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["chat_template"] = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    config_path.write_text(json.dumps(config))
    lines = [json.dumps({"prompt": f"Q{i}: what is {i} + 1?", "completion": f" {i + 1}."}) for i in range(40)]
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("\n".join(lines) + "\n")
    (data / "valid.jsonl").write_text("\n".join(lines[:8]) + "\n")
    out = tmp_path / "out"
    code = main([str(QUICKSTART), *FAST, "--set", f"data={data}", "--set", f"model={model}", "--set", "mask_prompt=true",
                 "--set", "attention.compare=[blockwise]", "--set", "max_seq_length=128",
                 "--out", str(out)])  # fmt: skip
    assert code == 0
    records = read_records(out / "blockwise" / "metrics.jsonl")
    # Only completion tokens count: a few per example (" 12." and EOS), never the prompt.
    per_row = [r["tokens"] / 4 for r in records]
    assert all(0 < n < 128 / 3 for n in per_row), per_row


def test_packing_refuses_absolute_position_models(tmp_path):
    model = builtin.write_model(tmp_path / "gpt2", {
        "model_type": "gpt2", "n_ctx": 128, "n_embd": 32, "n_head": 2, "n_layer": 1, "n_positions": 128,
        "layer_norm_epsilon": 1e-5, "vocab_size": builtin.BYTE_VOCAB_SIZE,
    })  # fmt: skip
    result = cli(QUICKSTART, "--set", f"model={model}", "--set", "iters=1", "--set", "attention.compare=[blockwise]",
                 "--out", tmp_path / "o")  # fmt: skip
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert "model type 'gpt2' has learned absolute position embeddings" in lines[-1]
    assert "Traceback" not in result.stderr


def test_data_the_tokenizer_cannot_read_is_one_line(tmp_path):
    # Completions data needs a chat template; the built-in byte tokenizer has none.
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text("".join(json.dumps({"prompt": f"Q{i}?", "completion": " A."}) + "\n" for i in range(8)))
    result = cli(QUICKSTART, "--set", f"data={data}", "--set", "iters=1", "--out", tmp_path / "o")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "data: cannot tokenize example 1 of train.jsonl: Cannot use chat template" in result.stderr.strip().splitlines()[-1]
