"""Sequence packing: tokenised examples laid end to end, cut into full-length chunks.

mlx-lm trains on one example per row, padded to the longest in the batch.
With short examples (a line of chat, a question and answer) every row is a
few dozen tokens and attention costs next to nothing, so a comparison of
attention kernels shows nothing. ``pack_sequences: true`` instead lays the
tokenised examples end to end, in file order (each already ends with EOS),
and cuts the stream into rows of exactly ``max_seq_length`` tokens: every
batch is ``(batch_size, max_seq_length)``, the long-context case flash
attention is for.

A data set too small to fill ``batch_size`` rows is repeated until it does,
and the last row wraps around to the start of the data set, so no row is
padded. Attention is causal over the whole row, across example boundaries,
as in most pre-training; prompt masking does not apply (each row's offset
is 0).
"""

from typing import List, Sequence, Tuple


class PackedDataset:
    """Rows of ``length`` tokens cut from the examples of ``dataset``.

    Args:
        dataset: an mlx-lm data set whose items are ``(tokens, offset)``
            (a ``CacheDataset``).
        length: tokens per row (the recipe's ``max_seq_length``).
        min_rows: at least this many rows (the batch size), repeating the
            data if it is short.
    """

    def __init__(self, dataset, length: int, min_rows: int = 1):
        stream: List[int] = []
        for i in range(len(dataset)):
            stream.extend(dataset[i][0])
        if not stream:
            raise ValueError("no tokens to pack")
        rows = max(min_rows, -(-len(stream) // length))
        repeats = -(-rows * length // len(stream))
        stream = (stream * repeats)[: rows * length]
        self.length = length
        self.examples = len(dataset)
        self._rows = [stream[r * length : (r + 1) * length] for r in range(rows)]

    def __getitem__(self, idx: int) -> Tuple[Sequence[int], int]:
        return self._rows[idx], 0

    def __len__(self) -> int:
        return len(self._rows)

    def itemlen(self, idx: int) -> int:
        return len(self._rows[idx])
