"""Recipes: loading, ``--set`` overrides, validation and path resolution.

A recipe is a YAML file whose keys are mlx-lm's LoRA config keys (so an
mlx-lm config reads naturally) plus two sections of its own::

    attention:
      variant: auto              # one of mlx_flash.VARIANTS
      compare: [manual, demo]    # run the recipe once per variant instead
    output:
      dir: runs/quickstart       # metrics, reports and adapters go here
      plot: true                 # compare.png when matplotlib is installed

Every problem with a recipe raises ``RecipeError`` with a one-line message
that names the key or file; the command line turns it into exit status 2.

Paths read from the YAML (``model``, ``data``) resolve against the recipe's
folder, so a recipe and its data travel together; paths given with ``--set``
or ``--out`` resolve against the working directory, like any command-line
path. ``output.dir`` names where results go and so resolves against the
working directory too.
"""

import copy
import difflib
import re
import types
from pathlib import Path
from typing import Any, Dict, List, Optional

import yaml

from ..attention import VARIANTS
from . import builtin


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

# key -> (accepted types, default). A dict default is a nested section whose
# own keys are checked the same way.
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
}
SCHEMA = {
    "model": (str, _REQUIRED),
    "data": (str, _REQUIRED),
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
    "max_seq_length": (int, 2048),
    "grad_checkpoint": (bool, False),
    "grad_accumulation_steps": (int, 1),
    "mask_prompt": (bool, False),
    "text_feature": (str, "text"),
    "prompt_feature": (str, "prompt"),
    "completion_feature": (str, "completion"),
    "chat_feature": (str, "messages"),
    "lora_parameters": (dict, LORA_PARAMETERS),
    "resume": (bool, False),
    "attention": (dict, ATTENTION),
    "output": (dict, OUTPUT),
}

FINE_TUNE_TYPES = ("lora", "dora", "full")
OPTIMIZERS = ("adam", "adamw", "sgd", "adafactor")
POSITIVE = (
    "batch_size",
    "iters",
    "steps_per_report",
    "steps_per_eval",
    "save_every",
    "max_seq_length",
    "grad_accumulation_steps",
    "lora_parameters.rank",
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
    """Defaults filled in, unknown keys and wrong types rejected."""
    for key in values:
        if key not in schema:
            raise _unknown(prefix + key, schema)
    checked = {}
    for key, (types_, default) in schema.items():
        name = prefix + key
        if isinstance(default, dict) and types_ is dict:
            section = values.get(key, {})
            if section is None:
                section = {}
            if not isinstance(section, dict):
                raise RecipeError(f"{name}: expected a mapping, got {section!r}")
            checked[key] = _check(section, default, name + ".")
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
        _, default = schema[part]
        if not isinstance(default, dict):
            raise RecipeError(f"--set {key}: '{'.'.join(parts[: depth + 1])}' has no sub-keys")
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node, schema = node[part], default


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

    So ``recipes/quickstart.yaml`` (and plain ``quickstart``) work from an
    installed wheel as they do from the repository root.
    """
    path = Path(name).expanduser()
    if path.exists():
        return path
    from importlib.resources import files

    stem = path.name[: -len(".yaml")] if path.name.endswith(".yaml") else path.name
    shipped = Path(str(files("mlx_flash.recipes"))) / f"{stem}.yaml"
    if shipped.exists():
        return shipped
    raise RecipeError(f"{name}: no such recipe file")


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
        raise RecipeError(f"{key}: no such data folder {path} (expected train.jsonl, valid.jsonl, test.jsonl)")
    if not (path / "train.jsonl").is_file():
        raise RecipeError(f"{key}: missing data file {path / 'train.jsonl'}")
    return str(path)


def _validate(values: dict) -> None:
    for key in POSITIVE:
        if _get(values, key) < 1:
            raise RecipeError(f"{key}: must be at least 1, got {_get(values, key)}")
    if values["fine_tune_type"] not in FINE_TUNE_TYPES:
        raise RecipeError(
            f"fine_tune_type: unknown value '{values['fine_tune_type']}' (choose from {', '.join(FINE_TUNE_TYPES)})"
        )
    if values["optimizer"] not in OPTIMIZERS:
        raise RecipeError(f"optimizer: unknown value '{values['optimizer']}' (choose from {', '.join(OPTIMIZERS)})")
    if not 0.0 <= values["lora_parameters"]["dropout"] < 1.0:
        raise RecipeError(f"lora_parameters.dropout: must be in [0, 1), got {values['lora_parameters']['dropout']}")
    attention = values["attention"]
    for key, variant in [("attention.variant", attention["variant"])] + [
        (f"attention.compare[{i}]", v) for i, v in enumerate(attention["compare"])
    ]:
        if variant not in VARIANTS:
            close = difflib.get_close_matches(str(variant), VARIANTS, n=1)
            hint = f"; did you mean '{close[0]}'?" if close else ""
            raise RecipeError(f"{key}: unknown variant {variant!r} (choose from {', '.join(VARIANTS)}{hint})")
    if len(set(attention["compare"])) != len(attention["compare"]):
        raise RecipeError("attention.compare: each variant may appear only once")
    if values["lr_schedule"] is not None:
        schedule = values["lr_schedule"]
        if "name" not in schedule or "arguments" not in schedule:
            raise RecipeError("lr_schedule: needs 'name' and 'arguments' (as in mlx-lm)")


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
        resolved, plus ``recipe`` (the file), ``name`` (its stem) and
        ``variants`` (the variants to run, in order).
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
    values = _check(values, SCHEMA)
    _validate(values)

    here = Path.cwd()
    recipe_dir = path.resolve().parent
    values["model"] = _resolve_model(values["model"], here if "model" in from_cli else recipe_dir)
    values["data"] = _resolve_data(values["data"], here if "data" in from_cli else recipe_dir)
    out_dir = out or values["output"]["dir"] or str(Path("runs") / path.stem)
    values["output"]["dir"] = str((here / Path(out_dir).expanduser()).resolve())

    recipe = types.SimpleNamespace(**values)
    recipe.recipe = str(path)
    recipe.name = path.stem
    recipe.variants = list(values["attention"]["compare"]) or [values["attention"]["variant"]]
    return recipe


def recipe_dict(recipe: types.SimpleNamespace) -> Dict[str, Any]:
    """The recipe's keys (not the derived fields) as a plain dictionary."""
    return {key: copy.deepcopy(getattr(recipe, key)) for key in SCHEMA}
