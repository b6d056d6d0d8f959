"""Training data: a folder's ``{train,valid,test}.jsonl`` read and checked line by line.

mlx-lm reads each file with ``json.loads`` per line and tells the format
from the first record, so a blank line, a byte that is not UTF-8 or a record
of another shape surfaces as a ``JSONDecodeError``, ``UnicodeDecodeError`` or
``KeyError`` that names neither file nor line, some only when that example's
batch comes up mid-run. Here every file is read and checked once, before the
model loads, and a problem is one ``RecipeError`` naming the file and line.
Blank lines are skipped. The records then become mlx-lm's own data sets
(``create_dataset``), so formats and tokenisation are mlx-lm's:

- ``{"prompt": ..., "completion": ...}`` (``prompt_feature``, ``completion_feature``)
- ``{"messages": [{"role": ..., "content": ...}, ...]}`` (``chat_feature``)
- ``{"text": ...}`` (``text_feature``)

``train.jsonl`` is required; without ``valid.jsonl`` the run trains without
validation and says so; ``test.jsonl`` is required when ``test: true``.
A ``data`` that names a Hugging Face dataset, and ``hf_dataset``, are read by
mlx-lm's own loader, which needs the ``datasets`` package.
"""

import json
import types
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from ..text import first_line
from .config import RecipeError

SPLITS = ("train", "valid", "test")
_FORMAT_HELP = "https://github.com/ml-explore/mlx-lm/blob/main/mlx_lm/LORA.md#data"


def is_local(recipe) -> bool:
    """Whether the recipe's data is a local folder (else mlx-lm reads it from the hub)."""
    return not recipe.hf_dataset and Path(recipe.data).is_dir()


def _line_of(raw: bytes, offset: int) -> Tuple[int, int]:
    """1-based (line, column) of byte ``offset`` in ``raw``."""
    line = raw.count(b"\n", 0, offset) + 1
    return line, offset - (raw.rfind(b"\n", 0, offset) + 1) + 1


# Each file is read once per process, though the command checks it before
# anything loads and every variant of a comparison loads it again.
_READ: Dict[Tuple[str, int, int], List[Tuple[int, dict]]] = {}


def read_split(path: Path) -> List[Tuple[int, dict]]:
    """``(line number, record)`` for each record of one JSONL file, each a JSON
    object; blank lines are skipped."""
    try:
        status = path.stat()
        key = (str(path), status.st_mtime_ns, status.st_size)
        if key in _READ:
            return _READ[key]
        raw = path.read_bytes()
    except OSError as e:
        raise RecipeError(f"data: cannot read {path} ({e.strerror or e})") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line, column = _line_of(raw, e.start)
        kind = "a binary file, not JSONL text" if b"\0" in raw[:8192] else "not UTF-8 text"
        raise RecipeError(
            f"data: {path} line {line}: {kind} (byte 0x{raw[e.start]:02x} at column {column})"
        ) from None
    records = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise RecipeError(f"data: {path} line {number}: invalid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(record, dict):
            raise RecipeError(f"data: {path} line {number}: expected a JSON object, got {type(record).__name__}")
        records.append((number, record))
    _READ[key] = records
    return records


def _format(recipe, record: dict) -> Optional[str]:
    """mlx-lm's choice of format for a first ``record`` (create_dataset's order)."""
    if recipe.prompt_feature in record and recipe.completion_feature in record:
        return "completions"
    if recipe.chat_feature in record:
        return "chat"
    if recipe.text_feature in record:
        return "text"
    return None


def _check_record(recipe, kind: str, record: dict) -> Optional[str]:
    """Why ``record`` does not fit format ``kind``, or None."""
    if kind == "completions":
        for key in (recipe.prompt_feature, recipe.completion_feature):
            if not isinstance(record.get(key), str):
                return f"'{key}' must be a string, like the first record's" if key in record else f"no '{key}' key"
    elif kind == "chat":
        messages = record.get(recipe.chat_feature)
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            what = "a list of messages" if recipe.chat_feature in record else None
            return f"'{recipe.chat_feature}' must be {what}" if what else f"no '{recipe.chat_feature}' key"
    elif not isinstance(record.get(recipe.text_feature), str):
        return f"'{recipe.text_feature}' must be a string" if recipe.text_feature in record else f"no '{recipe.text_feature}' key"
    return None


def check(recipe) -> Tuple[Dict[str, list], List[str]]:
    """Read and check the data folder: ``(records per split, warnings)``.

    ``records[split]`` is a list of dicts, empty for a missing optional file.
    Data from the hub is only checked for the package that reads it (the
    records come when the run loads them).
    """
    if not is_local(recipe):
        _require_datasets(recipe)
        return {}, []
    folder = Path(recipe.data)
    records, warnings = {}, []
    kind = None
    for split in SPLITS:
        path = folder / f"{split}.jsonl"
        if not path.exists():
            if split == "train":
                raise RecipeError(f"data: missing data file {path}")
            if split == "test" and recipe.test:
                raise RecipeError(f"test: true but there is no {path}")
            if split == "valid":
                warnings.append(f"data: no {path}: training runs without validation")
            records[split] = []
            continue
        numbered = read_split(path)
        if not numbered:
            raise RecipeError(f"data: {path} is empty")
        if kind is None:
            kind = _format(recipe, numbered[0][1])
            if kind is None:
                keys = ", ".join(sorted(numbered[0][1])) or "none"
                raise RecipeError(
                    f"data: {path} line {numbered[0][0]}: unsupported data format (keys: {keys}); expected "
                    f"'{recipe.text_feature}', '{recipe.chat_feature}', or '{recipe.prompt_feature}' and "
                    f"'{recipe.completion_feature}' (see {_FORMAT_HELP})"
                )
            if kind == "text" and recipe.mask_prompt:
                raise RecipeError(f"mask_prompt: {path} is text data, which has no prompt to mask")
        for number, record in numbered:
            problem = _check_record(recipe, kind, record)
            if problem:
                raise RecipeError(f"data: {path} line {number}: {problem} ({kind} data)")
        records[split] = [record for _, record in numbered]
    return records, warnings


def _namespace(recipe, **changes):
    return types.SimpleNamespace(**{**vars(recipe), **changes})


def load(recipe, tokenizer):
    """``(train, valid, test)`` as mlx-lm data sets (not yet cached or packed)."""
    from mlx_lm.tuner.datasets import create_dataset

    if not is_local(recipe):
        return _load_from_hub(recipe, tokenizer)
    records, _ = check(recipe)
    return tuple(create_dataset(records[s], tokenizer, recipe) if records[s] else [] for s in SPLITS)


def _hub_name(recipe) -> str:
    return "hf_dataset" if recipe.hf_dataset else f"data: {recipe.data}"


def _require_datasets(recipe) -> None:
    try:
        import datasets  # noqa: F401 - mlx-lm imports it inside its loader, with no hint
    except ImportError:
        raise RecipeError(
            f"{_hub_name(recipe)} is a Hugging Face dataset, which needs the datasets package "
            "(pip install datasets); or point data at a folder with train.jsonl"
        ) from None


def _load_from_hub(recipe, tokenizer):
    from mlx_lm.tuner.datasets import load_dataset

    name = _hub_name(recipe)
    _require_datasets(recipe)
    try:
        return load_dataset(_namespace(recipe, train=True), tokenizer)
    except Exception as e:  # noqa: BLE001 - network, missing splits, formats: all one line
        raise RecipeError(f"{name}: cannot load ({first_line(e)})") from None
