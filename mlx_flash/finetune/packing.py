"""Sequence packing with document masks: whole examples in full rows, exact.

mlx-lm trains on one example per row, padded to the longest in its batch.
With short examples (a line of chat, a question and answer) every row is a
few dozen tokens, and a step's fixed costs dominate. ``pack_sequences:
true`` instead packs whole examples into rows of ``max_seq_length`` tokens
and trains on them *exactly* as on the examples alone:

* attention stays inside each example: the rows carry per-token document
  ids, passed to attention through ``mlx_flash.segments`` (fused, ``O(L)``);
  RoPE models need no position reset, since their scores depend only on
  distances inside a document;
* the loss counts only targets in the same example as their input, so no
  target crosses a document boundary, and with ``mask_prompt`` only the
  completion of each example, as mlx-lm does for one example per row.

Packing is best-fit decreasing: longest examples first, each into the
fullest row it still fits, so an example is never split across rows. An
example longer than a row is truncated to it (mlx-lm truncates the same
way). Padding at the end of a row has id -1: attended by nothing, no loss.
A data set too small to fill ``batch_size`` rows repeats its rows.

Models with learned absolute position embeddings (``gpt2``,
``gpt_bigcode``: a ``wpe`` table) would see every example after the first
at the wrong positions; ``check_model`` refuses them.
"""

import bisect
from typing import List, Sequence, Tuple

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ..documents import segments

#: Token and document id of padding at the end of a row.
PAD_TOKEN = 0
PAD_ID = -1


class PackedDataset:
    """Rows of ``length`` tokens, each holding whole examples of ``dataset``.

    Args:
        dataset: an mlx-lm data set whose items are ``(tokens, offset)``
            (a ``CacheDataset``); ``offset`` is where the completion starts.
        length: tokens per row (the recipe's ``max_seq_length``).
        min_rows: at least this many rows (the batch size), repeating rows
            if the data is short.
        mask_prompt: count loss only from each example's ``offset`` on.

    Each item is ``(tokens, ids, targets)``: ``(length,)`` token ids,
    ``(length,)`` document ids (-1 for padding) and the ``(length - 1,)``
    0/1 mask of the next-token targets that count.
    """

    def __init__(self, dataset, length: int, min_rows: int = 1, mask_prompt: bool = False):
        examples = [dataset[i] for i in range(len(dataset))]
        examples = [(list(tokens)[:length], offset) for tokens, offset in examples if len(tokens)]
        if not examples:
            raise ValueError("no tokens to pack")
        self.length = length
        self.examples = len(examples)
        self.truncated = sum(1 for i in range(len(dataset)) if len(dataset[i][0]) > length)
        rows = _best_fit_decreasing([len(tokens) for tokens, _ in examples], length)
        self._rows = [self._row([examples[i] for i in members], mask_prompt) for members in rows]
        self.tokens = sum(len(tokens) for tokens, _ in examples)
        self.fill_ratio = self.tokens / (len(self._rows) * length)
        self.unique_rows = len(self._rows)
        while len(self._rows) < min_rows:
            self._rows += self._rows[: min_rows - len(self._rows)]

    def _row(self, members: List[Tuple[Sequence[int], int]], mask_prompt: bool):
        tokens = np.full(self.length, PAD_TOKEN, np.int32)
        ids = np.full(self.length, PAD_ID, np.int32)
        counts = np.zeros(self.length, np.int32)  # 1 where the token is a target that counts
        start = 0
        for doc, (example, offset) in enumerate(members):
            n = len(example)
            tokens[start : start + n] = example
            ids[start : start + n] = doc
            # Targets are the tokens after the first of each example; with
            # mask_prompt, those from the completion's offset on (mlx-lm's rule).
            first = max(1, offset) if mask_prompt else 1
            counts[start + first : start + n] = 1
            start += n
        return tokens, ids, counts[1:]

    def __getitem__(self, idx: int):
        return self._rows[idx]

    def __len__(self) -> int:
        return len(self._rows)

    def itemlen(self, idx: int) -> int:
        return self.length


def _best_fit_decreasing(lengths: List[int], capacity: int) -> List[List[int]]:
    """Indices of ``lengths`` grouped into rows of at most ``capacity``,
    longest first, each into the row with the least room that still fits
    it. Rows come out in a fixed order (that of their first member)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rows: List[List[int]] = []
    free: List[Tuple[int, int]] = []  # (room left, row), sorted
    for i in order:
        at = bisect.bisect_left(free, (lengths[i], -1))
        if at == len(free):
            rows.append([i])
            room, row = capacity - lengths[i], len(rows) - 1
        else:
            room, row = free.pop(at)
            rows[row].append(i)
            room -= lengths[i]
        if room > 0:
            bisect.insort(free, (room, row))
    return rows


def packed_loss(model, tokens, ids, targets):
    """Mean next-token cross entropy over the targets that count, with
    attention kept inside each document. Returns ``(loss, n_targets)``, as
    mlx-lm's ``default_loss`` does."""
    with segments(ids[:, :-1]):
        logits = model(tokens[:, :-1])
    counted = targets.astype(mx.float32)
    ce = nn.losses.cross_entropy(logits, tokens[:, 1:]) * counted
    n_targets = targets.sum()
    return ce.astype(mx.float32).sum() / n_targets, n_targets


def document_losses(model, tokens, ids, targets) -> List[Tuple[float, float]]:
    """For each document of one packed row ``(tokens, ids, targets)``: its
    summed next-token loss in the packed row and run alone, unpacked. The
    two agree to float32 rounding when packing is exact; the fine-tune
    records the largest difference as its check."""
    with segments(mx.array(ids[None, :-1])):
        logits = model(mx.array(tokens[None, :-1]))
    packed = nn.losses.cross_entropy(logits, mx.array(tokens[None, 1:]))[0] * mx.array(targets)
    pairs = []
    for doc in sorted(set(ids.tolist()) - {PAD_ID}):
        where = np.flatnonzero(ids == doc)
        start, stop = int(where[0]), int(where[-1]) + 1
        if stop - start < 2:
            continue
        alone_tokens = mx.array(tokens[None, start:stop])
        alone = nn.losses.cross_entropy(model(alone_tokens[:, :-1]), alone_tokens[:, 1:])[0]
        counted = mx.array(targets[start : stop - 1])
        pairs.append((float(mx.sum(packed[start : stop - 1]).item()), float(mx.sum(alone * counted).item())))
    return pairs


def check_model(model: nn.Module, model_type: str) -> None:
    """Raise ``ValueError`` for a model with learned absolute position
    embeddings, which packed rows would feed wrong positions."""
    names = {name.rsplit(".", 1)[-1] for name, _ in model.named_modules()}
    if "wpe" in names:
        raise ValueError(
            f"pack_sequences: model type '{model_type}' has learned absolute position embeddings, "
            "so packed examples would see the wrong positions; set pack_sequences: false"
        )
