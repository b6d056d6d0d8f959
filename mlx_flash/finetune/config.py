"""Recipes: loading, ``--set`` overrides, validation and path resolution.

A recipe is a YAML file whose keys are mlx-lm's LoRA config keys (so an
mlx-lm config reads naturally) plus two sections of its own::

    attention:
      variant: auto              # one of mlx_flash.VARIANTS
      compare: [manual, demo]    # run the recipe once per variant instead
    output:
      dir: runs/quickstart       # metrics, reports and adapters go here
      plot: true                 # compare.png when matplotlib is installed
      generations: 4             # greedy answers to 4 test prompts, before and after
      generation_tokens: 32      # at most this many tokens each

``model`` is an mlx-lm model folder, a Hugging Face repo id, a built-in model
(``builtin:tiny-llama``), a GGUF file (``gguf:PATH``) or a GGUF shipped in a
package (``smollm2-135m``; gguf.py).

``optimizer_config`` and ``lr_schedule`` are mlx-lm's free-form mappings
(``optimizer_config: {adamw: {weight_decay: 0.01}}``); they are checked by
building the optimizer and schedule. ``pack_sequences: true`` (not an mlx-lm
key) packs the examples into rows of ``max_seq_length`` tokens (packing.py).

Every problem with a recipe raises ``RecipeError`` with a one-line message
that names the key or file; the command line turns it into exit status 2.

Paths read from the YAML (``model``, ``data``) resolve against the recipe's
folder, so a recipe and its data travel together; paths given with ``--set``
or ``--out`` resolve against the working directory, like any command-line
path. ``output.dir`` names where results go and so resolves against the
working directory too. ``adapter_path``, when a recipe sets it, means what
it means to ``mlx_lm.lora``: a folder relative to the working directory (one
subfolder per variant when several run); left out, each variant's adapters
go to ``adapters/`` inside its run folder.
"""

import copy
import difflib
import inspect
import json
import os
import re
import types
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import yaml

from ..attention import VARIANTS
from ..folders import unwritable
from ..text import first_line
from . import builtin, gguf


class RecipeError(ValueError):
    """A recipe problem the user can fix; ``str()`` is the whole message."""


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``1e-5`` as a string; read it as the float it means."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:\d[\d_]*)?(?:\.\d*)?[eE][-+]?\d+$|^[-+]?\d[\d_]*\.\d*$|^[-+]?\.\d+$"),
    list("-+0123456789."),
)

_REQUIRED = object()

# key -> (accepted types, default). The sections named in SECTIONS have their
# own keys, checked the same way; other mappings (optimizer_config,
# lr_schedule) are free-form, as in mlx-lm, and checked by building them.
LORA_PARAMETERS = {
    "rank": (int, 8),
    "scale": ((int, float), 20.0),
    "dropout": ((int, float), 0.0),
    "keys": ((list, type(None)), None),
}
ATTENTION = {
    "variant": (str, "auto"),
    "compare": (list, []),
}
OUTPUT = {
    "dir": ((str, type(None)), None),
    "plot": (bool, True),
    # Greedy answers to this many held-out prompts, before and after training (generations.py).
    "generations": (int, 0),
    "generation_tokens": (int, 32),
}
SCHEMA = {
    "model": (str, _REQUIRED),
    "data": ((str, type(None)), None),  # required unless hf_dataset names the data
    "train": (bool, True),
    "fine_tune_type": (str, "lora"),
    "optimizer": (str, "adam"),
    "optimizer_config": (dict, {}),
    "seed": (int, 0),
    "num_layers": (int, 16),
    "batch_size": (int, 4),
    "iters": (int, 100),
    "val_batches": (int, 25),
    "test": (bool, False),
    "test_batches": (int, 500),
    "learning_rate": ((int, float), 1e-5),
    "lr_schedule": ((dict, type(None)), None),
    "steps_per_report": (int, 10),
    "steps_per_eval": (int, 200),
    "save_every": (int, 100),
    "adapter_path": (str, "adapters"),
    "resume_adapter_file": ((str, type(None)), None),
    "max_seq_length": (int, 2048),
    "grad_checkpoint": (bool, False),
    "grad_accumulation_steps": (int, 1),
    "clear_cache_threshold": ((int, str), 0),
    "mask_prompt": (bool, False),
    "trust_remote_code": (bool, False),
    "hf_dataset": ((dict, list, type(None)), None),
    # Not an mlx-lm key: lay examples end to end in max_seq_length rows (packing.py).
    "pack_sequences": (bool, False),
    # Not an mlx-lm key: tokens per MLP chunk, recomputed in the backward (mlx_flash.step).
    "chunk_tokens": ((int, str), "auto"),
    # Not an mlx-lm key: ranks per row, each holding a slice of it (mlx_flash.context).
    "context_parallel": (int, 1),
    # Not an mlx-lm key: full logits, the chunked loss, or chosen by size (loss_choice.py).
    "loss": (str, "auto"),
    "text_feature": (str, "text"),
    "prompt_feature": (str, "prompt"),
    "completion_feature": (str, "completion"),
    "chat_feature": (str, "messages"),
    "lora_parameters": (dict, {}),
    "resume": (bool, False),
    # mlx-lm keys that mean nothing here: accepted, and a warning says so (IGNORED).
    "report_to": ((str, type(None)), None),
    "project_name": ((str, type(None)), None),
    "wandb": ((str, type(None)), None),
    "config": ((str, type(None)), None),
    "attention": (dict, {}),
    "output": (dict, {}),
}

#: mlx-lm keys accepted but not acted on, and why; a warning names each one set.
IGNORED = {
    "report_to": "metrics go to metrics.jsonl and summary.json, not to wandb or swanlab",
    "project_name": "it names a wandb or swanlab project, and nothing is reported there",
    "wandb": "metrics go to metrics.jsonl and summary.json, not to wandb",
    "config": "it is the file mlx-lm read its keys from; here the recipe is that file",
}

SECTIONS = {"lora_parameters": LORA_PARAMETERS, "attention": ATTENTION, "output": OUTPUT}

FINE_TUNE_TYPES = ("lora", "dora", "full")
OPTIMIZERS = ("adam", "adamw", "muon", "sgd", "adafactor")
LOSSES = ("auto", "full", "chunked")
POSITIVE = (
    "batch_size",
    "iters",
    "steps_per_report",
    "steps_per_eval",
    "save_every",
    "max_seq_length",
    "grad_accumulation_steps",
    "context_parallel",
    "lora_parameters.rank",
    "output.generation_tokens",
)

_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string",
               list: "a list", dict: "a mapping", type(None): "null"}


def _type_name(types_) -> str:
    types_ = types_ if isinstance(types_, tuple) else (types_,)
    if float in types_:
        types_ = tuple(t for t in types_ if t is not int)
    return " or ".join(_TYPE_NAMES[t] for t in types_)


def _is_instance(value, types_) -> bool:
    types_ = types_ if isinstance(types_, tuple) else (types_,)
    # YAML's true is a Python bool, which is also an int: do not let it pass
    # as a batch size.
    if isinstance(value, bool) and bool not in types_:
        return False
    return isinstance(value, types_)


def _unknown(key: str, choices) -> RecipeError:
    name = key.rsplit(".", 1)[-1]
    close = difflib.get_close_matches(name, list(choices), n=1)
    hint = f" (did you mean '{key[: -len(name)]}{close[0]}'?)" if close else ""
    return RecipeError(f"unknown key '{key}'{hint}")


def _check(values: dict, schema: dict, prefix: str = "") -> dict:
    """Defaults filled in, unknown keys and wrong types rejected.

    Only top-level keys named in ``SECTIONS`` are nested sections.
    """
    for key in values:
        if key not in schema:
            raise _unknown(prefix + key, schema)
    checked = {}
    for key, (types_, default) in schema.items():
        name = prefix + key
        if not prefix and key in SECTIONS:
            section = values.get(key, {})
            if section is None:
                section = {}
            if not isinstance(section, dict):
                raise RecipeError(f"{name}: expected a mapping, got {section!r}")
            checked[key] = _check(section, SECTIONS[key], name + ".")
            continue
        if key not in values:
            if default is _REQUIRED:
                raise RecipeError(f"missing required key '{name}'")
            checked[key] = copy.deepcopy(default)
            continue
        value = values[key]
        if not _is_instance(value, types_):
            raise RecipeError(f"{name}: expected {_type_name(types_)}, got {value!r} ({type(value).__name__})")
        if types_ == (int, float):
            value = float(value)
        checked[key] = value
    return checked


def _get(values: dict, dotted: str):
    for part in dotted.split("."):
        values = values[part]
    return values


# Free-form mappings: --set gives them whole, as YAML.
WHOLE_MAPPINGS = {
    "optimizer_config": "'optimizer_config={adamw: {weight_decay: 0.01}}'",
    "lr_schedule": "'lr_schedule={name: cosine_decay, arguments: [1e-5, 1000], warmup: 100}'",
}


def parse_override(text: str) -> tuple:
    """``"a.b=value"`` -> ``("a.b", value)`` with ``value`` read as YAML."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise RecipeError(f"--set {text!r}: expected KEY=VALUE, e.g. --set lora_parameters.rank=16")
    try:
        value = yaml.load(raw, Loader=_Loader) if raw.strip() else ""
    except yaml.YAMLError:
        raise RecipeError(f"--set {key}: cannot read value {raw!r} as YAML") from None
    return key, value


def _apply_override(values: dict, key: str, value) -> None:
    """Set dotted ``key`` in the raw recipe ``values``, creating sections."""
    parts = key.split(".")
    schema, node = SCHEMA, values
    for depth, part in enumerate(parts):
        if part not in schema:
            raise _unknown(key, schema)
        if depth == len(parts) - 1:
            node[part] = value
            return
        if depth > 0 or part not in SECTIONS:
            section = ".".join(parts[: depth + 1])
            if part in WHOLE_MAPPINGS:
                raise RecipeError(
                    f"--set {key}: '{section}' is set as a whole mapping, e.g. --set {WHOLE_MAPPINGS[part]}"
                )
            raise RecipeError(f"--set {key}: '{section}' has no sub-keys")
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node, schema = node[part], SECTIONS[part]


def read_yaml(path: Path) -> dict:
    try:
        text = path.read_text()
    except OSError as e:
        raise RecipeError(f"{path}: cannot read recipe ({e.strerror or e})") from None
    try:
        values = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        problem = getattr(e, "problem", None) or "invalid YAML"
        raise RecipeError(f"{path}: cannot parse YAML{where}: {problem}") from None
    if values is None:
        values = {}
    if not isinstance(values, dict):
        raise RecipeError(f"{path}: a recipe is a mapping of keys to values, not {type(values).__name__}")
    return values


def find_recipe(name: str) -> Path:
    """``name`` as a path, or else a recipe shipped in ``mlx_flash.recipes``.

    Only a bare name (``quickstart`` or ``quickstart.yaml``: no folder part)
    that is not a file here falls back to the shipped recipe of that name, so
    ``quickstart`` works from an installed wheel; so does the repository path
    the documentation uses, ``recipes/quickstart.yaml``. Any other path
    (``./quickstart.yaml``, ``mine/quickstart.yaml``) means that file and no
    other: if it is missing, that is an error, not a silent substitute.
    """
    path = Path(name).expanduser()
    if path.exists():
        return path
    parts = name.replace(os.sep, "/").split("/")
    bare = len(parts) == 1 or (len(parts) == 2 and parts[0] == "recipes" and path.suffix == ".yaml")
    if bare and not name.startswith("~") and path.suffix in ("", ".yaml"):
        from importlib.resources import files

        try:
            shipped = Path(str(files("mlx_flash.recipes"))) / f"{path.stem if path.suffix else path.name}.yaml"
        except ModuleNotFoundError:  # a bare source tree, where recipes/ is not yet mlx_flash.recipes
            shipped = None
        if shipped is not None and shipped.is_file():
            return shipped
    raise RecipeError(f"recipe file not found: {name}")


def _looks_like_hub_id(model: str) -> bool:
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", model) is not None


def _resolve_model(model: str, base: Path, key: str = "model") -> str:
    if builtin.is_builtin(model):
        name = model[len(builtin.PREFIX) :]
        if name not in builtin.MODELS:
            close = difflib.get_close_matches(name, list(builtin.MODELS), n=1)
            hint = f" (did you mean '{builtin.PREFIX}{close[0]}'?)" if close else ""
            raise RecipeError(f"{key}: unknown built-in model '{model}'{hint}")
        return model
    if gguf.is_gguf(model):
        try:
            return gguf.resolve(model, base)
        except gguf.GGUFError as e:
            raise RecipeError(f"{key}: {e}") from None
    path = (base / Path(model).expanduser()).resolve()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise RecipeError(f"{key}: {path} has no config.json (not an mlx-lm model folder)")
        return str(path)
    if _looks_like_hub_id(model) and not model.startswith("."):
        # A Hugging Face repo id: mlx-lm downloads it (or finds it in the
        # Hugging Face cache) when the run starts.
        return model
    raise RecipeError(f"{key}: no such model folder {path}")


def _resolve_data(data: str, base: Path, key: str = "data") -> str:
    path = (base / Path(data).expanduser()).resolve()
    if not path.is_dir():
        if _looks_like_hub_id(data) and not data.startswith("."):
            # A Hugging Face dataset, which mlx-lm's loader reads (data.py).
            return data
        raise RecipeError(f"{key}: no such data folder {path} (expected train.jsonl, valid.jsonl, test.jsonl)")
    if not (path / "train.jsonl").is_file():
        raise RecipeError(f"{key}: missing data file {path / 'train.jsonl'}")
    return str(path)


def _resolve_file(name: str, base: Path, key: str) -> str:
    path = (base / Path(name).expanduser()).resolve()
    if not path.is_file():
        raise RecipeError(f"{key}: no such file {path}")
    return str(path)


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(i?)b?\s*$", re.IGNORECASE)


def parse_size(value, key: str) -> int:
    """Bytes from an integer or a size: ``"500MB"``, ``"2G"`` in powers of 1000,
    as mlx-lm reads ``--clear-cache-threshold``; ``"2GiB"`` in powers of 1024."""
    if isinstance(value, int):
        return value
    match = _SIZE.match(value)
    if not match:
        raise RecipeError(f"{key}: expected a number of bytes or a size like 2GB, got {value!r}")
    number, unit, binary = match.groups()
    return int(float(number) * (1024 if binary else 1000) ** " kmgt".index(unit.lower() or " "))


def model_config(model: str) -> Optional[dict]:
    """The ``config.json`` of ``model``, read without loading weights, or None
    where it is not at hand (a hub model not yet in the Hugging Face cache)."""
    if builtin.is_builtin(model):
        return builtin.MODELS.get(model[len(builtin.PREFIX) :])
    path = Path(model) / "config.json"
    if not path.is_file():
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(model, "config.json")
        except Exception:  # noqa: BLE001 - not a repo id, or no cache: nothing to read
            return None
        if not isinstance(cached, str):
            return None
        path = Path(cached)
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def _check_num_layers(model: str, num_layers: int) -> None:
    config = model_config(model) or {}
    layers = config.get("num_hidden_layers") or (config.get("text_config") or {}).get("num_hidden_layers")
    if isinstance(layers, int) and num_layers > layers:
        raise RecipeError(f"num_layers: {num_layers} but {model} has only {layers} layers (or -1 for all)")


def check_paths(recipe, adapter_dirs: List[Path]) -> None:
    """Raise ``RecipeError`` if a run could not write its output, adapters or
    built-in model; checked before anything loads."""
    problem = unwritable(Path(recipe.output["dir"]))
    if problem:
        raise RecipeError(f"output.dir: {problem}")
    for path in adapter_dirs:
        problem = unwritable(path)
        if problem:
            raise RecipeError(f"adapter_path: {problem}")
    if builtin.is_builtin(recipe.model) and not builtin.cached(recipe.model):
        problem = unwritable(builtin.cache_root())
        if problem:
            raise RecipeError(
                f"MLX_FLASH_CACHE: {problem}; the built-in model is built there on first use, "
                "so point MLX_FLASH_CACHE at a folder you can write"
            )


def _validate(values: dict) -> None:
    if values["data"] is None and not values["hf_dataset"]:
        raise RecipeError("missing required key 'data'")
    if not values["train"]:
        raise RecipeError(
            "train: false asks mlx-lm to only evaluate; this command always trains "
            "(evaluate adapters with mlx_lm.lora --test --adapter-path DIR)"
        )
    for key in POSITIVE:
        if _get(values, key) < 1:
            raise RecipeError(f"{key}: must be at least 1, got {_get(values, key)}")
    for key in ("val_batches", "test_batches"):
        if values[key] < -1:
            raise RecipeError(f"{key}: must be -1 (the whole set), 0 (none) or more, got {values[key]}")
    if not values["learning_rate"] > 0:
        raise RecipeError(f"learning_rate: must be above 0, got {values['learning_rate']}")
    values["clear_cache_threshold"] = parse_size(values["clear_cache_threshold"], "clear_cache_threshold")
    _check_hf_dataset(values["hf_dataset"])
    chunk = values["chunk_tokens"]
    if chunk != "auto" and (not isinstance(chunk, int) or isinstance(chunk, bool) or chunk < 0):
        raise RecipeError(f"chunk_tokens: must be auto, 0 (no chunking) or a token count, got {chunk!r}")
    if values["fine_tune_type"] not in FINE_TUNE_TYPES:
        raise RecipeError(
            f"fine_tune_type: unknown value '{values['fine_tune_type']}' (choose from {', '.join(FINE_TUNE_TYPES)})"
        )
    if values["optimizer"] not in OPTIMIZERS:
        raise RecipeError(f"optimizer: unknown value '{values['optimizer']}' (choose from {', '.join(OPTIMIZERS)})")
    if values["loss"] not in LOSSES:
        raise RecipeError(f"loss: unknown value '{values['loss']}' (choose from {', '.join(LOSSES)})")
    if values["loss"] == "chunked" and values["context_parallel"] > 1:
        raise RecipeError("loss: chunked and context_parallel > 1 do not combine; use loss: auto or full")
    if values["output"]["generations"] < 0:
        raise RecipeError(f"output.generations: must be at least 0, got {values['output']['generations']}")
    if values["num_layers"] != -1 and values["num_layers"] < 1:
        raise RecipeError(f"num_layers: must be -1 (every layer) or at least 1, got {values['num_layers']}")
    if not 0.0 <= values["lora_parameters"]["dropout"] < 1.0:
        raise RecipeError(f"lora_parameters.dropout: must be in [0, 1), got {values['lora_parameters']['dropout']}")
    attention = values["attention"]
    for key, variant in [("attention.variant", attention["variant"])] + [
        (f"attention.compare[{i}]", v) for i, v in enumerate(attention["compare"])
    ]:
        name, sep, option = str(variant).partition(":")
        if sep and key != "attention.variant":
            if option != "padded":
                raise RecipeError(
                    f"{key}: unknown option ':{option}' in {variant!r} (the one option is ':padded', "
                    "that variant on mlx-lm's padded batches)"
                )
            variant = name
        if variant not in VARIANTS:
            close = difflib.get_close_matches(str(variant), VARIANTS, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise RecipeError(f"{key}: unknown variant {variant!r} (choose from {', '.join(VARIANTS)}{hint})")
    if len(set(attention["compare"])) != len(attention["compare"]):
        raise RecipeError("attention.compare: each variant may appear only once")
    _check_schedule(values["lr_schedule"])
    for name, options in values["optimizer_config"].items():
        if name not in OPTIMIZERS:
            raise _unknown(f"optimizer_config.{name}", OPTIMIZERS)
        if options is None:
            continue
        if not isinstance(options, dict):
            raise RecipeError(f"optimizer_config.{name}: expected a mapping of options, got {options!r}")
        # Building the optimizer is the check mlx itself makes of its options.
        try:
            build_optimizer(name, {name: options}, values["learning_rate"])
        except (TypeError, ValueError) as e:
            raise RecipeError(f"optimizer_config.{name}: {first_line(e)}") from None


def _check_hf_dataset(spec) -> None:
    if spec is None:
        return
    for i, item in enumerate(spec if isinstance(spec, list) else [spec]):
        where = f"hf_dataset[{i}]" if isinstance(spec, list) else "hf_dataset"
        if not isinstance(item, dict) or not isinstance(item.get("path"), str):
            raise RecipeError(f"{where}: expected a mapping with the dataset's 'path' (as in mlx-lm), got {item!r}")


def ignored_keys(values: dict) -> List[str]:
    """One warning per mlx-lm key that is set but means nothing here (``IGNORED``)."""
    return [f"{key}: {values[key]!r} is ignored: {why}" for key, why in IGNORED.items() if values.get(key) is not None]


def _schedules() -> List[str]:
    """Names of the schedules ``lr_schedule.name`` may take (mlx.optimizers.schedulers)."""
    import mlx.optimizers.schedulers as schedulers

    return [
        name
        for name, fn in vars(schedulers).items()
        if inspect.isfunction(fn) and fn.__module__ == schedulers.__name__ and name != "join_schedules"
    ]


def _check_schedule(schedule: Optional[dict]) -> None:
    if schedule is None:
        return
    if "name" not in schedule or "arguments" not in schedule:
        raise RecipeError("lr_schedule: needs 'name' and 'arguments' (as in mlx-lm)")
    for key in schedule:
        if key not in ("name", "arguments", "warmup", "warmup_init"):
            raise _unknown(f"lr_schedule.{key}", ("name", "arguments", "warmup", "warmup_init"))
    names = _schedules()
    if schedule["name"] not in names:
        close = difflib.get_close_matches(str(schedule["name"]), names, n=1)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise RecipeError(f"lr_schedule.name: unknown schedule {schedule['name']!r} (choose from {', '.join(names)}{hint})")
    if not isinstance(schedule["arguments"], list) or not schedule["arguments"]:
        raise RecipeError(f"lr_schedule.arguments: expected a non-empty list, got {schedule['arguments']!r}")
    try:
        build_schedule(schedule)(0)
    except (TypeError, ValueError) as e:
        raise RecipeError(f"lr_schedule: cannot build {schedule['name']}: {first_line(e)}") from None


def build_schedule(schedule: dict):
    """The learning-rate schedule an mlx-lm ``lr_schedule`` mapping describes."""
    from mlx_lm.tuner.utils import build_schedule as mlx_lm_build_schedule

    return mlx_lm_build_schedule(schedule)


def build_optimizer(name: str, options: dict, learning_rate, lr_schedule: Optional[dict] = None):
    """``mlx.optimizers`` optimizer ``name`` with ``options[name]`` as keywords."""
    import mlx.optimizers as optim

    kind = {"adam": optim.Adam, "adamw": optim.AdamW, "muon": optim.Muon, "sgd": optim.SGD, "adafactor": optim.Adafactor}
    rate = build_schedule(lr_schedule) if lr_schedule else learning_rate
    return kind[name](learning_rate=rate, **(options.get(name) or {}))


def load_recipe(
    name: str,
    overrides: Optional[List[str]] = None,
    out: Optional[str] = None,
) -> types.SimpleNamespace:
    """Read, override, check and resolve a recipe.

    Args:
        name: recipe path (or the name of a shipped recipe).
        overrides: ``KEY=VALUE`` strings from ``--set``; dotted keys reach
            into sections, values are YAML (``--set attention.compare=[manual,demo]``).
        out: ``--out``, which replaces ``output.dir``.

    Returns:
        A namespace with every key of ``SCHEMA`` (sections as dicts), paths
        resolved, plus ``recipe`` (the file), ``name`` (its stem),
        ``variants`` (the variants to run, in order) and ``warnings`` (one
        line per mlx-lm key that is set but ignored here).
    """
    path = find_recipe(name)
    values = read_yaml(path)
    for key in values:
        if key not in SCHEMA:
            raise _unknown(str(key), SCHEMA)
    from_cli = set()
    for text in overrides or []:
        key, value = parse_override(text)
        _apply_override(values, key, value)
        from_cli.add(key)
    adapter_path_given = "adapter_path" in values
    values = _check(values, SCHEMA)
    _validate(values)

    here = Path.cwd()
    recipe_dir = path.resolve().parent
    base = {key: here if key in from_cli else recipe_dir for key in ("model", "data", "resume_adapter_file")}
    values["model"] = _resolve_model(values["model"], base["model"])
    if values["data"] is not None:
        values["data"] = _resolve_data(values["data"], base["data"])
    if values["resume_adapter_file"]:
        values["resume_adapter_file"] = _resolve_file(
            values["resume_adapter_file"], base["resume_adapter_file"], "resume_adapter_file"
        )
    _check_num_layers(values["model"], values["num_layers"])
    if adapter_path_given:
        # mlx-lm's meaning: a folder relative to the working directory.
        values["adapter_path"] = str((here / Path(values["adapter_path"]).expanduser()).resolve())
    out_dir = out or values["output"]["dir"] or str(Path("runs") / path.stem)
    values["output"]["dir"] = str((here / Path(out_dir).expanduser()).resolve())

    recipe = types.SimpleNamespace(**values)
    recipe.recipe = str(path)
    recipe.name = path.stem
    recipe.variants = list(values["attention"]["compare"]) or [values["attention"]["variant"]]
    recipe.warnings = ignored_keys(values)
    return recipe


def run_entry(entry: str) -> Tuple[str, bool]:
    """``(variant, padded)`` of an ``attention.compare`` entry: ``"mlx"`` is
    the variant on the recipe's own batches, ``"mlx:padded"`` the variant on
    mlx-lm's padded batches (stock mlx-lm) even when the recipe packs."""
    name, _, option = entry.partition(":")
    return name, option == "padded"


def run_name(entry: str) -> str:
    """The folder name of a run: ``mlx:padded`` runs in ``mlx-padded``."""
    return entry.replace(":", "-")


def recipe_dict(recipe: types.SimpleNamespace) -> Dict[str, Any]:
    """The recipe's keys (not the derived fields) as a plain dictionary."""
    return {key: copy.deepcopy(getattr(recipe, key)) for key in SCHEMA}
