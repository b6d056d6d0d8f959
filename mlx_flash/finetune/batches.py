"""The batches of a run, in an order that a resumed run can continue exactly.

The batching is mlx-lm's (``mlx_lm.tuner.trainer.iterate_batches``): the
examples are sorted by token count and cut into batches of ``batch_size``
neighbours, each rank of a data-parallel run taking every ``size``-th example
of a batch; each epoch visits the batches in a fresh random permutation; a
batch is padded to one more than a multiple of 32 tokens (at most
``max_seq_length``) and longer examples are truncated to ``max_seq_length``.

mlx-lm draws the permutations from NumPy's global generator, which anything
else may also draw from (its own ``evaluate`` does, once per validation), so
the order after the first epoch depends on when validation ran, and an
iterator cannot be rebuilt mid-run. Here the permutations come from a
generator of their own, ``np.random.RandomState(seed)``, one per epoch, the
same draws ``iterate_batches`` makes after ``np.random.seed(seed)``: batch
``k`` of a run is a function of the data, the seed and ``k`` alone, and a run
resumed after iteration ``k`` asks for batch ``k`` next.

The sort is by tokens, which is what mlx-lm's sort means to do: its
``CacheDataset.itemlen`` measures the raw record (a dict of one key for text
data), so there every example has the same "length" and batches keep file
order.
"""

from typing import Iterator, List, Optional, Sequence, Tuple

import mlx.core as mx
import numpy as np

PAD_MULTIPLE = 32


class Batches:
    """Batch ``k`` (0-based) of the endless seeded sequence over ``dataset``.

    Args:
        dataset: items ``(tokens, offset)`` (mlx-lm's ``CacheDataset``), or
            packed rows ``(tokens, ids, targets)`` (``PackedDataset``).
        batch_size: examples per batch over all ranks.
        max_seq_length: longest row; longer examples are truncated.
        seed: seed of the permutation of each epoch.
        rank, size: this process's rank and the number of ranks; each rank
            gets ``batch_size // size`` of every batch's examples.
    """

    def __init__(self, dataset, batch_size: int, max_seq_length: int, seed: int, rank: int = 0, size: int = 1):
        if len(dataset) < batch_size:
            raise ValueError(f"the data set has {len(dataset)} examples, fewer than batch_size={batch_size}")
        if batch_size % size:
            raise ValueError(f"batch_size={batch_size} is not divisible by the {size} ranks")
        self.dataset = dataset
        self.max_seq_length = max_seq_length
        self.seed = seed
        self.rows = batch_size // size
        self.lengths = [len(dataset[i][0]) for i in range(len(dataset))]
        order = sorted(range(len(dataset)), key=self.lengths.__getitem__)
        self.groups: List[List[int]] = [
            order[i + rank : i + batch_size : size] for i in range(0, len(order) - batch_size + 1, batch_size)
        ]
        self._epoch = -1
        self._permutation: Optional[np.ndarray] = None
        self._rng: Optional[np.random.RandomState] = None

    def __len__(self) -> int:
        """Batches per epoch."""
        return len(self.groups)

    def truncated(self) -> int:
        """How many examples are longer than ``max_seq_length`` (and lose their end)."""
        return sum(n > self.max_seq_length for n in self.lengths)

    def _order(self, epoch: int) -> np.ndarray:
        # Permutations are drawn in sequence, so going back means starting
        # the generator again; a run only ever goes forward.
        if self._rng is None or epoch < self._epoch:
            self._rng, self._epoch = np.random.RandomState(self.seed), -1
        while self._epoch < epoch:
            self._permutation = self._rng.permutation(len(self.groups))
            self._epoch += 1
        return self._permutation

    def indices(self, k: int) -> List[int]:
        """Indices into the data set of this rank's examples in batch ``k``."""
        epoch, position = divmod(k, len(self.groups))
        return self.groups[int(self._order(epoch)[position])]

    def batch(self, k: int) -> Tuple[mx.array, ...]:
        """Batch ``k``: tokens ``(rows, T)`` int32, zero-padded, and ``(rows, 2)``
        ``[offset, length]`` per row, as ``iterate_batches`` yields them; for
        packed rows ``(tokens, ids, targets)`` (``packing.PackedDataset``)."""
        return make_batch([self.dataset[j] for j in self.indices(k)], self.max_seq_length)

    def epoch(self, epoch: int = 0) -> Iterator[Tuple[mx.array, ...]]:
        """The batches of one epoch, in order."""
        for position in range(len(self.groups)):
            yield self.batch(epoch * len(self.groups) + position)


def make_batch(items: Sequence, max_seq_length: int) -> Tuple[mx.array, ...]:
    """Rows ``(tokens, offset)`` padded into one array, as mlx-lm pads them;
    packed rows ``(tokens, ids, targets)``, all of one length, stacked."""
    if len(items[0]) == 3:
        return tuple(mx.array(np.stack(part)) for part in zip(*items))
    tokens = [item[0] for item in items]
    offsets = [item[1] for item in items]
    lengths = [min(len(t), max_seq_length) for t in tokens]
    width = min(1 + PAD_MULTIPLE * ((max(len(t) for t in tokens) + PAD_MULTIPLE - 1) // PAD_MULTIPLE), max_seq_length)
    rows = np.zeros((len(tokens), width), np.int32)
    for row, (t, n) in enumerate(zip(tokens, lengths)):
        rows[row, :n] = t[:n]
    return mx.array(rows), mx.array(list(zip(offsets, lengths)))


def evaluation_batches(seed: int):
    """An ``iterate_batches`` for mlx-lm's ``evaluate``: one epoch in a fixed seeded
    order, so every validation of a run (resumed or not) sees the same batches
    and none draws from NumPy's global generator."""

    made = {}

    def iterate(dataset, batch_size, max_seq_length, comm_group=None, **_):
        rank, size = (comm_group.rank(), comm_group.size()) if comm_group is not None else (0, 1)
        key = (id(dataset), batch_size, max_seq_length, rank, size)
        if key not in made:
            made[key] = Batches(dataset, batch_size, max_seq_length, seed, rank, size)
        return made[key].epoch(0)

    return iterate
