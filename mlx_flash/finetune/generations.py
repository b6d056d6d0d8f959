"""Greedy generations from held-out prompts, before and after training.

A falling loss says that the model changed; a few answers say how. With
``output.generations: N`` in a recipe, after each variant's run the base
model answers the first N prompts of the data set's ``test.jsonl``
(``valid.jsonl`` if there is none) greedily; then the run's saved adapters
are applied with mlx-lm's own ``load_adapters``, so what is tested is the
files on disk, and the same prompts are answered again. Both passes run
under the variant's attention. A prompt is a chat record without its final
assistant turn (that turn is the expected answer), or a completions
record's prompt; both go through the tokenizer's chat template, as mlx-lm's
data sets do.

Each run folder gets ``generations.json`` (the texts as generated) and
``generations.md``; the comparison report shows all variants side by side.
"""

import json
import time
from pathlib import Path
from typing import Dict, List

from mlx_lm.tuner.utils import load_adapters

from ..patch import patched
from . import files
from .config import RecipeError, run_entry
from .progress import note
from .train import load_base

GENERATIONS_JSON = "generations.json"
GENERATIONS_MD = "generations.md"


def held_out(recipe) -> List[dict]:
    """The first ``output.generations`` held-out examples, each
    ``{"question", "messages", "expected"}`` (``expected`` may be None).

    Raises ``RecipeError`` when generations are asked for but the data has no
    test or validation records with a prompt (a ``text`` data set has none).
    """
    count = recipe.output["generations"]
    if count == 0:
        return []
    folder = Path(recipe.data)
    path = next((folder / f"{name}.jsonl" for name in ("test", "valid") if (folder / f"{name}.jsonl").is_file()), None)
    if path is None:
        raise RecipeError(f"output.generations: {folder} has no test.jsonl or valid.jsonl to take prompts from")
    examples = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip() and len(examples) < count:
                example = _example(json.loads(line), recipe)
                if example is not None:
                    examples.append(example)
    if not examples:
        raise RecipeError(
            f"output.generations: {path} has no chat ('{recipe.chat_feature}') or completions "
            f"('{recipe.prompt_feature}') records to prompt with"
        )
    return examples


def _example(record: dict, recipe):
    if isinstance(record.get(recipe.chat_feature), list):
        messages = record[recipe.chat_feature]
        expected = None
        if messages and messages[-1].get("role") == "assistant":
            messages, expected = messages[:-1], messages[-1].get("content")
        users = [m.get("content", "") for m in messages if m.get("role") == "user"]
        return {"question": users[-1] if users else "", "messages": messages, "expected": expected}
    if recipe.prompt_feature in record:
        question = record[recipe.prompt_feature]
        return {
            "question": question,
            "messages": [{"role": "user", "content": question}],
            "expected": record.get(recipe.completion_feature),
        }
    return None


def answer(model, tokenizer, messages: List[dict], max_tokens: int) -> str:
    """The greedy continuation of ``messages`` rendered by the chat template."""
    from mlx_lm import generate

    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    return generate(model, tokenizer, prompt, max_tokens=max_tokens)


def run(recipe, variant: str, run_dir: Path, adapters: Path, examples: List[dict]) -> List[dict]:
    """Answer ``examples`` before and after training; write the two files into ``run_dir``.

    Returns one record per example: ``question``, ``expected``, ``before``, ``after``.
    """
    started = time.perf_counter()
    max_tokens = recipe.output["generation_tokens"]
    note(variant, f"generations: loading model {recipe.model}")
    model, tokenizer, _, _ = load_base(recipe)

    def answers(when: str) -> List[str]:
        out = []
        for i, e in enumerate(examples):
            note(variant, f"generating {i + 1}/{len(examples)} {when} training (at most {max_tokens} tokens)")
            out.append(answer(model, tokenizer, e["messages"], max_tokens))
        return out

    with patched(run_entry(variant)[0]):
        before = answers("before")
        model = load_adapters(model, str(adapters))
        model.eval()
        after = answers("after")
    records = [
        {"question": e["question"], "expected": e["expected"], "before": b, "after": a}
        for e, b, a in zip(examples, before, after)
    ]
    files.write_json(
        run_dir / GENERATIONS_JSON,
        {
            "variant": variant,
            "adapters": str(adapters),
            "max_tokens": max_tokens,
            "time_s": time.perf_counter() - started,
            "generations": records,
        },
    )
    files.write_text(run_dir / GENERATIONS_MD, markdown({variant: records}, title=f"# {recipe.name}: {variant}"))
    return records


def _cell(text) -> str:
    if text is None:
        return "-"
    text = " ".join(str(text).split()) or "(nothing)"
    return text.replace("|", "\\|")


def markdown(by_variant: Dict[str, List[dict]], title: str = "## Greedy generations on held-out prompts") -> str:
    """Per prompt, a table of the answers before and after training, one column per variant."""
    variants = list(by_variant)
    if not variants:
        return ""
    lines = [
        title,
        "",
        "Greedy decoding from held-out prompts (not in the training data): the base model (before) "
        "and the same model with the run's adapters loaded from disk (after).",
        "",
    ]
    for i, first in enumerate(by_variant[variants[0]]):
        expected = f" (expected: {_cell(first['expected'])})" if first["expected"] is not None else ""
        lines += [
            f"**{_cell(first['question'])}**{expected}",
            "",
            "| | " + " | ".join(variants) + " |",
            "|---|" + "---|" * len(variants),
        ]
        for when in ("before", "after"):
            lines.append(f"| {when} | " + " | ".join(_cell(by_variant[v][i][when]) for v in variants) + " |")
        lines.append("")
    return "\n".join(lines)
