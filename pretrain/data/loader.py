"""Reading a prepared dataset: ``Batch``, the ``Loader`` protocol, and ``TokenLoader``.

A split is one concatenated token sequence cut into windows of ``seq_len + 1`` tokens starting
every ``seq_len`` tokens (consecutive windows share their boundary token, as in nanoGPT, so
every token but the first is a target exactly once per epoch). Each epoch visits the windows in
a permutation seeded by (seed, dataset fingerprint, epoch). Global sample ``i`` is a pure
function of those, and global batch ``k`` is samples ``[k*G, (k+1)*G)``, of which rank ``r`` of
``W`` takes the contiguous ``G/W`` rows at ``r*G/W``; the loader's state is just the global
sample position, so a resume continues the same stream with any world size or number of workers.

Before it reads a token, a loader verifies every shard of its split against the manifest
(:func:`~pretrain.data.format.verify_shard`), remembering what it hashed in the
:class:`~pretrain.data.format.VerifiedShards` it is given.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import numpy as np

from pretrain.data.format import (
    ShardInfo,
    VerifiedShards,
    load_manifest,
    read_shard,
    verify_shard,
)
from pretrain.errors import UserError

if TYPE_CHECKING:
    import torch


@dataclass
class Batch:
    """This rank's rows of one global batch: ``inputs``/``targets`` int64 ``(G // W, T)``.

    ``doc_ids[b, t]`` numbers the documents within row ``b`` from 0: input tokens with equal ids
    belong to the same document (an end-of-text token belongs to the document it ends).
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    doc_ids: torch.Tensor | None = None


@runtime_checkable
class Loader(Protocol):
    """What the training loop asks of a data source, pretraining and fine-tuning alike.

    An endless iterator of :class:`Batch` for one rank, whose position ``state_dict()``
    captures and ``load_state_dict()`` restores, so a resumed run sees the same batches.
    """

    def __iter__(self) -> Loader: ...

    def __next__(self) -> Batch: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class TokenStream:
    """A split's shards as one concatenated token sequence, memory-mapped lazily per process."""

    def __init__(self, shards: list[ShardInfo]):
        self.paths = [s.path for s in shards]
        self.token_offsets = np.cumsum([0] + [s.num_tokens for s in shards], dtype=np.int64)
        self.doc_offsets = np.cumsum([0] + [s.num_docs for s in shards], dtype=np.int64)
        self._maps: list[tuple[np.ndarray, np.ndarray]] | None = None

    def __len__(self) -> int:
        return int(self.token_offsets[-1])

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_maps": None}  # worker processes map the files themselves

    @property
    def maps(self) -> list[tuple[np.ndarray, np.ndarray]]:
        if self._maps is None:
            self._maps = [read_shard(p) for p in self.paths]
        return self._maps

    def _pieces(self, start: int, length: int) -> Iterator[tuple[int, int, int]]:
        """``(shard, begin, end)`` ranges within shards that cover ``[start, start + length)``."""
        shard = int(np.searchsorted(self.token_offsets, start, side="right")) - 1
        end = start + length
        while start < end:
            base = int(self.token_offsets[shard])
            stop = min(end, int(self.token_offsets[shard + 1]))
            yield shard, start - base, stop - base
            start, shard = stop, shard + 1

    def read(self, start: int, length: int, out: np.ndarray) -> None:
        """Copy tokens ``[start, start + length)`` into ``out`` (converting the dtype)."""
        pos = 0
        for shard, begin, end in self._pieces(start, length):
            out[pos : pos + end - begin] = self.maps[shard][0][begin:end]
            pos += end - begin

    def doc_index(self, start: int, length: int, out: np.ndarray) -> None:
        """Global document index of every token in ``[start, start + length)`` into ``out``."""
        pos = 0
        for shard, begin, end in self._pieces(start, length):
            starts = self.maps[shard][1]
            positions = np.arange(begin, end, dtype=np.uint64)
            local = np.searchsorted(starts, positions, side="right").astype(np.int64) - 1
            out[pos : pos + end - begin] = local + self.doc_offsets[shard]
            pos += end - begin


class WindowPlan:
    """The deterministic sample order: which window global sample ``i`` is.

    Windows are ``[j*T, j*T + T + 1)`` for ``j < (N - 1) // T``; epoch ``e`` visits them in the
    order of a permutation seeded by ``(seed, fingerprint, e)``.
    """

    def __init__(self, stream: TokenStream, seq_len: int, seed: int, fingerprint: str):
        self.stream, self.seq_len, self.seed, self.fingerprint = stream, seq_len, seed, fingerprint
        self.num_windows = (len(stream) - 1) // seq_len
        self._perms: dict[int, np.ndarray] = {}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_perms": {}}

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            if len(self._perms) >= 2:
                self._perms.pop(min(self._perms))
            entropy = [self.seed & (2**63 - 1), int(self.fingerprint, 16), epoch]
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence(entropy)))
            self._perms[epoch] = rng.permutation(self.num_windows)
        return self._perms[epoch]

    def windows(self, first: int, count: int) -> np.ndarray:
        """Window indices of global samples ``first .. first + count - 1``."""
        samples = np.arange(first, first + count, dtype=np.int64)
        epochs, offsets = np.divmod(samples, self.num_windows)
        out = np.empty(count, dtype=np.int64)
        for epoch in np.unique(epochs):
            sel = epochs == epoch
            out[sel] = self.permutation(int(epoch))[offsets[sel]]
        return out

    def rows(self, first: int, count: int, with_doc_ids: bool) -> tuple:
        """Inputs, targets (and doc ids) of global samples ``first .. first + count - 1``.

        NumPy arrays, not tensors: from a worker process they travel pickled through a pipe,
        which for batches this size is several times faster than torch's shared-memory tensors.
        """
        T = self.seq_len
        inputs = np.empty((count, T), dtype=np.int64)
        targets = np.empty((count, T), dtype=np.int64)
        doc_ids = np.empty((count, T), dtype=np.int64) if with_doc_ids else None
        window = np.empty(T + 1, dtype=np.int64)
        for row, w in enumerate(self.windows(first, count)):
            start = int(w) * T
            self.stream.read(start, T + 1, window)
            inputs[row] = window[:-1]
            targets[row] = window[1:]
            if doc_ids is not None:
                self.stream.doc_index(start, T, doc_ids[row])
                doc_ids[row] -= doc_ids[row, 0]
        return inputs, targets, doc_ids


class _RankBatches:
    """One rank's batches from global sample ``start`` on: item ``k`` is its share of global batch
    ``k``. DataLoader workers take items round-robin and hand them out in order."""

    def __init__(self, plan: WindowPlan, start: int, global_batch: int, rank: int, world: int,
                 with_doc_ids: bool):  # fmt: skip
        self.plan, self.start, self.global_batch = plan, start, global_batch
        self.rank, self.world, self.with_doc_ids = rank, world, with_doc_ids

    def __getitem__(self, k: int) -> tuple:
        local = self.global_batch // self.world
        first = self.start + k * self.global_batch + self.rank * local
        return self.plan.rows(first, local, self.with_doc_ids)


def _as_is(batch: tuple) -> tuple:
    return batch


def _check_layout(seq_len: int, batch_size: int, rank: int, world_size: int, workers: int) -> None:
    """Refuse a batch shape, rank or worker count no loader could serve."""
    if seq_len < 1 or batch_size < 1:
        raise UserError(f"seq_len and batch_size must be positive, got {seq_len}, {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise UserError(f"rank {rank} is not in a world of size {world_size}")
    if batch_size % world_size:
        raise UserError(
            f"global batch size {batch_size} is not divisible by the world size {world_size}: "
            "every rank takes an equal share of each batch"
        )
    if workers < 0:
        raise UserError(f"num_workers must be >= 0, got {workers}")


class TokenLoader(Loader):
    """Endless batches of ``seq_len`` tokens from a prepared dataset, for one rank.

    The stream is a pure function of (seed, dataset fingerprint, global sample index), so it does
    not depend on the world size or the number of workers, and ``state_dict()`` (the global sample
    position) is all a resume needs. ``verified`` remembers which shard files were already hashed
    (default: this process's shared record); a factory of loaders passes each the same one.
    """

    def __init__(
        self,
        data_dir: str | Path,
        split: str = "train",
        seq_len: int = 256,
        batch_size: int = 8,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        num_workers: int = 0,
        return_doc_ids: bool = False,
        verified: VerifiedShards | None = None,
    ):
        _check_layout(seq_len, batch_size, rank, world_size, num_workers)
        self.manifest = load_manifest(data_dir, verified)
        stream = TokenStream(self._verified_shards(split, verified))
        if len(stream) < seq_len + 1:
            raise UserError(
                f"seq_len {seq_len} is longer than the data: the '{split}' split of "
                f"{self.manifest.data_dir} has {len(stream)} tokens, a window needs {seq_len + 1}"
            )
        self.split, self.seq_len, self.batch_size = split, seq_len, batch_size
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        self.return_doc_ids = return_doc_ids
        self.fingerprint = self.manifest.fingerprint(split)
        self.plan = WindowPlan(stream, seq_len, seed, self.fingerprint)
        self.position = 0  # global sample index of the next batch
        self._workers: Iterator | None = None

    def _verified_shards(self, split: str, verified: VerifiedShards | None) -> list[ShardInfo]:
        """The split's shards, each checked against the manifest; a missing split is refused."""
        shards = self.manifest.split_shards(split)
        if not shards:
            splits = sorted({s.split for s in self.manifest.shards})
            raise UserError(
                f"{self.manifest.data_dir} has no '{split}' split (it has: {', '.join(splits)})"
            )
        itemsize = np.dtype(self.manifest.token_dtype).itemsize
        for shard in shards:
            verify_shard(shard, itemsize, self.manifest.vocab_size, verified)
        return shards

    @property
    def seed(self) -> int:
        return self.plan.seed

    @property
    def num_windows(self) -> int:
        """Windows (samples) in one epoch."""
        return self.plan.num_windows

    @property
    def epoch(self) -> int:
        return self.position // self.plan.num_windows

    def __iter__(self) -> TokenLoader:
        return self

    def __next__(self) -> Batch:
        import torch  # here rather than at the top: `pretrain prepare` never needs it

        inputs, targets, doc_ids = self._next_rows()
        self.position += self.batch_size
        return Batch(
            torch.from_numpy(inputs),
            torch.from_numpy(targets),
            None if doc_ids is None else torch.from_numpy(doc_ids),
        )

    def _next_rows(self) -> tuple:
        batches = _RankBatches(
            self.plan, self.position, self.batch_size, self.rank, self.world_size,
            self.return_doc_ids,
        )  # fmt: skip
        if self.num_workers == 0:
            return batches[0]
        if self._workers is None:  # started here, at the position to continue from
            from torch.utils.data import DataLoader

            self._workers = iter(
                DataLoader(
                    batches,
                    batch_size=None,
                    sampler=itertools.count(),
                    num_workers=self.num_workers,
                    prefetch_factor=4,
                    collate_fn=_as_is,
                )
            )
        return next(self._workers)

    def state_dict(self) -> dict[str, Any]:
        return {
            "position": self.position,
            "epoch": self.epoch,
            "seed": self.seed,
            "fingerprint": self.fingerprint,
            "split": self.split,
            "seq_len": self.seq_len,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``; its seed wins, so the resumed stream is the saved one."""
        if state.get("fingerprint") != self.fingerprint:
            raise UserError(
                f"loader state is for another dataset (fingerprint {state.get('fingerprint')}, "
                f"{self.manifest.data_dir} '{self.split}' is {self.fingerprint}): resume with the "
                "data the run started with"
            )
        if state.get("seq_len") != self.seq_len:
            raise UserError(
                f"loader state has seq_len {state.get('seq_len')}, this loader {self.seq_len}"
            )
        self.plan = WindowPlan(self.plan.stream, self.seq_len, int(state["seed"]), self.fingerprint)
        self.position = int(state["position"])
        self.close()

    def close(self) -> None:
        """Stop the worker processes (they restart on the next batch)."""
        self._workers = None
