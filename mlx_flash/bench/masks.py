"""The benchmark's mask axis: a name for each attention structure it measures.

A mask name is ``none`` or ``causal``, optionally followed by ``+`` parts:

* ``docsN``: packed rows of documents of ``N`` tokens each (the last one
  shorter if ``N`` does not divide the length);
* ``docsA-B``: packed rows of documents of random lengths ``A..B``
  (seeded, so every variant sees the same layout);
* ``windowW``: a causal sliding window of ``W`` keys;
* ``sinks``: one attention-sink logit per query head.

``causal+docs512`` at ``L = 8192`` is 16 documents of 512 tokens, the
packed fine-tuning case; ``causal+window1024`` a Mistral-style layer;
``causal+window128+sinks`` a gpt-oss sliding layer. ``arguments`` turns a
name into the keyword arguments of ``mlx_flash.scaled_dot_product_attention``
(``mask``, ``segment_ids``, ``window``, ``sinks``), which every variant takes.
"""

import re
from typing import Dict, Optional

import mlx.core as mx
import numpy as np

_DOCS = re.compile(r"^docs(\d+)(?:-(\d+))?$")
_WINDOW = re.compile(r"^window(\d+)$")


def check(name: str) -> str:
    """``name`` if it is a valid mask name, else ``ValueError`` saying why."""
    parts = name.split("+")
    if parts[0] not in ("none", "causal"):
        raise ValueError(f"unknown mask '{name}': names start with 'none' or 'causal'")
    for part in parts[1:]:
        docs, window = _DOCS.match(part), _WINDOW.match(part)
        if docs:
            low, high = int(docs.group(1)), int(docs.group(2) or docs.group(1))
            if not 1 <= low <= high:
                raise ValueError(f"mask '{name}': document lengths '{part}' must be 1 <= A <= B")
        elif window:
            if parts[0] != "causal":
                raise ValueError(f"mask '{name}': a window needs 'causal'")
            if int(window.group(1)) < 1:
                raise ValueError(f"mask '{name}': window must be at least 1")
        elif part != "sinks":
            raise ValueError(f"mask '{name}': unknown part '{part}' (use docsN, docsA-B, windowW or sinks)")
    return name


def document_ids(length: int, low: int, high: int, batch: int, seed: int) -> mx.array:
    """``(batch, length)`` int32 ids of packed documents of ``low..high`` tokens."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(batch):
        sizes = []
        while sum(sizes) < length:
            sizes.append(int(rng.integers(low, high + 1)))
        rows.append(np.repeat(np.arange(len(sizes)), sizes)[:length])
    return mx.array(np.stack(rows).astype(np.int32))


def arguments(name: str, batch: int, length: int, heads: int, seed: int = 0) -> Dict[str, Optional[object]]:
    """Keyword arguments of the attention op for mask ``name`` on
    ``(batch, heads, length)`` self-attention."""
    parts = check(name).split("+")
    args: Dict[str, Optional[object]] = {"mask": "causal" if parts[0] == "causal" else None}
    for part in parts[1:]:
        docs, window = _DOCS.match(part), _WINDOW.match(part)
        if docs:
            low, high = int(docs.group(1)), int(docs.group(2) or docs.group(1))
            args["segment_ids"] = document_ids(length, low, high, batch, seed)
        elif window:
            args["window"] = int(window.group(1))
        else:
            args["sinks"] = mx.random.normal((heads,), key=mx.random.key(seed + 17))
    return args


def is_structured(name: str) -> bool:
    """Whether the mask has more than MLX's own ``none`` / ``causal``."""
    return "+" in name
