"""Infinite, resumable, sharded training batches: labeled + 0, 1 or 2 unlabeled streams.

Design
- One epoch is one pass over the unlabeled set (labeled ids repeat to that length), as in the
  original; with no unlabeled streams the epoch keeps the same length (same iterations).
- The order of epoch e is a permutation drawn from (seed, e, stream); rank r takes every
  world_size-th entry of it, so ranks are disjoint and together complete. Nothing else may
  shard these batches (do not pass them through `accelerator.prepare`).
- Each sample's augmentation is seeded from (seed, epoch, global position, stream), so the
  same batches come out whatever the number of workers, and after a resume.
- A torch DataLoader runs the work: its sampler (main process) yields one key per step, and a
  worker decodes and augments the whole step's batch. Resuming starts the sampler at the saved
  step, so skipped samples are never decoded.
- An unlabeled `datasets.IterableDataset` (streaming) is shuffled with a buffer, split by node
  once, and read in the main process as undecoded records, which travel inside the step keys
  to the workers. Its position is saved as (pass, records consumed) and restored by replaying
  the pass without decoding: exact, unlike the IterableDataset state_dict, which drops the
  shuffle buffer's contents on resume. Under DDP every rank's position is gathered into the
  saved state (`set_positions_of_all_ranks`), since shards end their passes at different steps.
"""

from __future__ import annotations

import collections
import copy
import functools
import math
import warnings
from typing import Any, Callable, Iterator

import cv2
import datasets
from datasets.distributed import split_dataset_by_node
import numpy as np
import torch
from torch.utils.data import DataLoader, Sampler

from .errors import DatasetError
from .loaders import class_spec_of

LABELED, UNLABELED = 0, 1


def sample_rng(seed: int, epoch: int, position: int, stream: int, rank: int | None = None) -> np.random.Generator:
    """Independent generator per sample: the key to worker- and resume-independent augmentation.

    Map-style positions are global (unique across ranks); streamed positions count within a
    rank's shard, so those pass `rank` to keep ranks from augmenting their i-th samples alike."""
    return np.random.default_rng([seed, epoch, position, stream] + ([] if rank is None else [rank]))


def _undecoded(dataset, columns: list[str]):
    """Same dataset, image/label columns returned as {"path", "bytes"} records (we decode)."""
    keep = [c for c in columns if c in (dataset.column_names or [])]
    dataset = dataset.select_columns(keep)
    for column in ("image", "label"):
        if column in keep and isinstance(dataset.features[column], datasets.Image):
            dataset = dataset.cast_column(column, datasets.Image(decode=False))
    return dataset


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)
    cv2.setNumThreads(1)


class _StepBatches(torch.utils.data.Dataset):
    """Worker side: a step key -> the collated batch of that step."""

    def __init__(self, plan: "_EpochPlan", labeled, unlabeled, transform: Callable, num_classes: int | None):
        self.plan, self.labeled, self.unlabeled = plan, labeled, unlabeled
        self.transform, self.num_classes = transform, num_classes

    def __len__(self) -> int:  # the sampler is infinite; DataLoader never asks with batch_size=None
        return 2**62

    def _apply(self, record: dict, rng: np.random.Generator, keep_label: bool) -> dict:
        if not keep_label:
            record = {k: v for k, v in record.items() if k != "label"}
        return self.transform(record, rng=rng)

    def __getitem__(self, key: tuple) -> dict:
        epoch, step, streamed = key
        seed = self.plan.seed
        labeled_items = []
        for position, index in self.plan.labeled_slice(epoch, step):
            record = self.labeled[int(index)]
            if record.get("label") is None:
                raise DatasetError(f"labeled sample {record.get('id')!r} has no label")
            labeled_items.append(self._apply(record, sample_rng(seed, epoch, position, LABELED), True))
        batch = {"labeled": _collate(labeled_items), "unlabeled": []}
        for stream in range(self.plan.num_unlabeled_streams):
            items = []
            if streamed is None:
                source = 0 if self.plan.same_unlabeled_order else stream
                for position, index in self.plan.unlabeled_slice(epoch, step, source):
                    record = self.unlabeled[int(index)]
                    items.append(self._apply(record, sample_rng(seed, epoch, position, UNLABELED + stream), False))
            else:
                for (pass_index, position), record in streamed[stream]:
                    rng = sample_rng(seed, pass_index, position, UNLABELED + stream, rank=self.plan.rank)
                    items.append(self._apply(record, rng, False))
            batch["unlabeled"].append(_collate(items))
        return batch


def _collate(items: list[dict]) -> dict:
    return {key: torch.stack([item[key] for item in items]) for key in items[0] if isinstance(items[0][key], torch.Tensor)}


class _EpochPlan:
    """Which dataset indices each (epoch, step, rank) uses; pure function of the settings."""

    def __init__(self, num_labeled, num_unlabeled, epoch_length, batch_size, seed, rank, world_size,
                 num_unlabeled_streams, same_unlabeled_order, drop_last):
        self.num_labeled, self.num_unlabeled, self.epoch_length = num_labeled, num_unlabeled, epoch_length
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.num_unlabeled_streams, self.same_unlabeled_order = num_unlabeled_streams, same_unlabeled_order
        global_batch = batch_size * world_size
        self.steps_per_epoch = epoch_length // global_batch if drop_last else math.ceil(epoch_length / global_batch)

    def _rng(self, epoch: int, stream: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, epoch, stream, 0x5EED])

    def _fit(self, order: np.ndarray) -> np.ndarray:
        """Truncate (drop_last) or wrap-pad the order to steps * global batch."""
        total = self.steps_per_epoch * self.batch_size * self.world_size
        if total > len(order):
            order = np.concatenate([order, order[: total - len(order)]])
        return order[:total]

    @functools.lru_cache(maxsize=4)
    def labeled_order(self, epoch: int) -> np.ndarray:
        """Labeled ids repeated to the epoch length (whole copies + a random remainder), shuffled."""
        rng = self._rng(epoch, LABELED)
        copies, remainder = divmod(self.epoch_length, self.num_labeled)
        repeated = np.concatenate([np.tile(np.arange(self.num_labeled), copies), rng.permutation(self.num_labeled)[:remainder]])
        return self._fit(repeated[rng.permutation(len(repeated))])

    @functools.lru_cache(maxsize=4)
    def unlabeled_order(self, epoch: int, stream: int) -> np.ndarray:
        return self._fit(self._rng(epoch, UNLABELED + stream).permutation(self.num_unlabeled))

    def _slice(self, order: np.ndarray, step: int) -> list[tuple[int, int]]:
        """(global position, dataset index) pairs of this rank's batch at `step`."""
        positions = [(step * self.batch_size + j) * self.world_size + self.rank for j in range(self.batch_size)]
        return [(p, int(order[p])) for p in positions]

    def labeled_slice(self, epoch: int, step: int):
        return self._slice(self.labeled_order(epoch), step)

    def unlabeled_slice(self, epoch: int, step: int, stream: int):
        return self._slice(self.unlabeled_order(epoch, stream), step)


class _StreamedPool:
    """Main-process reader of an unlabeled IterableDataset: undecoded records + exact position."""

    def __init__(self, dataset: datasets.IterableDataset, seed: int, shuffle_buffer: int):
        self.dataset = dataset.shuffle(seed=seed, buffer_size=shuffle_buffer) if shuffle_buffer > 1 else dataset
        self.pass_index, self.consumed, self._iterator = 0, 0, None

    def position(self) -> tuple[int, int]:
        return self.pass_index, self.consumed

    def seek(self, pass_index: int, consumed: int) -> None:
        self.pass_index, self.consumed, self._iterator = pass_index, 0, None
        self._start()
        for _ in range(consumed):  # records are undecoded here: replaying costs reads, not decodes
            self.take(1)

    def _start(self) -> None:
        self.dataset.set_epoch(self.pass_index)
        self._iterator = iter(self.dataset)

    def take(self, count: int) -> list[tuple[tuple[int, int], dict]]:
        out = []
        if self._iterator is None:
            self._start()
        while len(out) < count:
            try:
                record = next(self._iterator)
            except StopIteration:
                if self.consumed == 0:
                    raise DatasetError("the streamed unlabeled dataset yields no samples on this rank") from None
                self.pass_index, self.consumed = self.pass_index + 1, 0
                self._start()
                continue
            out.append(((self.pass_index, self.consumed), record))
            self.consumed += 1
        return out


class _StepKeys(Sampler):
    """Main-process sampler: one key per step from the resume point on, forever."""

    def __init__(self, owner: "TrainStreams", epoch: int, step: int):
        self.owner, self.epoch, self.step = owner, epoch, step

    def __iter__(self) -> Iterator[tuple]:
        epoch, step = self.epoch, self.step
        while True:
            streamed = None
            if self.owner._pools:
                streamed = self.owner._take_streamed()
            self.owner._positions_after.append(self.owner._pool_positions())
            yield epoch, step, streamed
            step += 1
            if step == self.owner.steps_per_epoch:
                epoch, step = epoch + 1, 0


class TrainStreams:
    """Infinite iterator of training batches; see the module docstring for the guarantees.

    `next(streams)` -> {"labeled": {"pixel_values", "labels"},
                        "unlabeled": [{"pixel_values"}, ...]  (one dict per unlabeled stream)}
    """

    def __init__(
        self,
        labeled: datasets.Dataset,
        unlabeled: datasets.Dataset | datasets.IterableDataset | None,
        transform: Callable[..., dict],
        batch_size: int,
        seed: int = 0,
        num_unlabeled_streams: int = 1,
        same_unlabeled_order: bool = False,
        rank: int = 0,
        world_size: int = 1,
        num_workers: int = 0,
        drop_last: bool = True,
        unlabeled_length: int | None = None,
        shuffle_buffer: int = 1000,
        num_classes: int | None = None,
        prefetch_factor: int = 2,
        pin_memory: bool = False,
    ):
        if num_unlabeled_streams not in (0, 1, 2):
            raise ValueError(f"num_unlabeled_streams must be 0, 1 or 2, got {num_unlabeled_streams}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        if labeled is None or len(labeled) == 0:
            raise DatasetError("TrainStreams: the labeled dataset is empty")
        if num_unlabeled_streams and unlabeled is None:
            raise DatasetError(f"TrainStreams: {num_unlabeled_streams} unlabeled stream(s) requested but no unlabeled dataset given")
        spec = class_spec_of(labeled)
        self.num_classes = num_classes if num_classes is not None else (len(spec.names) if spec else None)
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.num_unlabeled_streams, self.same_unlabeled_order = num_unlabeled_streams, same_unlabeled_order
        self.num_workers, self.prefetch_factor, self.pin_memory = num_workers, prefetch_factor, pin_memory

        streaming = isinstance(unlabeled, datasets.IterableDataset)
        if streaming:
            num_unlabeled = unlabeled_length or _known_length(unlabeled)
        else:
            num_unlabeled = len(unlabeled) if unlabeled is not None else 0
            if num_unlabeled == 0 and num_unlabeled_streams == 0:
                num_unlabeled = len(labeled)  # fully supervised on every image: epochs over the labeled set
        if num_unlabeled == 0:
            raise DatasetError("TrainStreams: the unlabeled dataset is empty")
        self.plan = _EpochPlan(len(labeled), num_unlabeled, num_unlabeled, batch_size, seed, rank, world_size,
                               num_unlabeled_streams, same_unlabeled_order, drop_last)
        if self.plan.steps_per_epoch == 0:
            raise DatasetError(
                f"TrainStreams: {num_unlabeled} samples per epoch are fewer than one global batch "
                f"({batch_size} x {world_size} ranks)"
            )
        labeled_raw = _undecoded(labeled, ["image", "label", "id"])
        unlabeled_raw = None
        self._pools: list[_StreamedPool] = []
        if num_unlabeled_streams and streaming:
            shard = split_dataset_by_node(_undecoded(unlabeled, ["image", "id"]), rank, world_size)
            count = 1 if same_unlabeled_order else num_unlabeled_streams
            self._pools = [_StreamedPool(shard, seed + stream, shuffle_buffer) for stream in range(count)]
        elif num_unlabeled_streams:
            unlabeled_raw = _undecoded(unlabeled, ["image", "id"])
        if getattr(transform, "num_classes", 0) is None and self.num_classes is not None:
            transform = copy.copy(transform)  # check label values against the dataset's classes
            transform.num_classes = self.num_classes
        self._worker_dataset = _StepBatches(self.plan, labeled_raw, unlabeled_raw, transform, self.num_classes)
        self.epoch, self.step = 0, 0
        self._iterator = None
        self._positions_after: collections.deque = collections.deque()
        self._pool_start = [(0, 0)] * len(self._pools)
        self._positions_by_rank: list | None = None

    @property
    def steps_per_epoch(self) -> int:
        return self.plan.steps_per_epoch

    # -- streamed pools (main process, called from the sampler)
    def _take_streamed(self) -> list[list]:
        taken = [pool.take(self.batch_size) for pool in self._pools]
        return taken * self.num_unlabeled_streams if self.same_unlabeled_order else taken

    def _pool_positions(self) -> list[tuple[int, int]]:
        return [pool.position() for pool in self._pools]

    # -- iteration
    def _start(self) -> None:
        for pool, (pass_index, consumed) in zip(self._pools, self._pool_start):
            pool.seek(pass_index, consumed)
        self._positions_after.clear()
        extra = {"prefetch_factor": self.prefetch_factor, "persistent_workers": False} if self.num_workers else {}
        loader = DataLoader(
            self._worker_dataset,
            batch_size=None,
            sampler=_StepKeys(self, self.epoch, self.step),
            num_workers=self.num_workers,
            worker_init_fn=_worker_init if self.num_workers else None,
            pin_memory=self.pin_memory,
            **extra,
        )
        self._iterator = iter(loader)

    def __iter__(self) -> "TrainStreams":
        return self

    def __next__(self) -> dict:
        if self._iterator is None:
            self._start()
        batch = next(self._iterator)
        self._pool_start = self._positions_after.popleft()
        self.step += 1
        if self.step == self.steps_per_epoch:
            self.epoch, self.step = self.epoch + 1, 0
        return batch

    # -- checkpointing
    def streamed_positions(self) -> list[list[int]]:
        """This rank's resume point in each streamed pool: [pass, records consumed] per pool."""
        return [list(p) for p in self._pool_start]

    def set_positions_of_all_ranks(self, positions_by_rank: list) -> None:
        """Record every rank's `streamed_positions()` (gathered, rank order) for the next `state_dict`.

        accelerate saves custom state from the main process only, and streamed shards of unequal
        length reach the end of a pass at different steps, so rank 0's positions are not the other
        ranks'. Call this on every rank (with `gather_object`) just before `save_state`."""
        if len(positions_by_rank) != self.world_size:
            raise ValueError(f"got streamed positions of {len(positions_by_rank)} ranks, expected {self.world_size}")
        self._positions_by_rank = [[list(p) for p in positions] for positions in positions_by_rank]

    def state_dict(self) -> dict[str, Any]:
        by_rank = self._positions_by_rank
        if by_rank is None or by_rank[self.rank] != self.streamed_positions():  # stale or never gathered
            by_rank = [self.streamed_positions()] if self.world_size == 1 else None
        return {
            "epoch": self.epoch,
            "step": self.step,
            "seed": self.seed,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
            "steps_per_epoch": self.steps_per_epoch,
            "streamed_positions": self.streamed_positions(),
            "streamed_positions_by_rank": by_rank,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("seed", "batch_size", "world_size", "steps_per_epoch"):
            if state.get(key) != getattr(self, key):
                raise ValueError(f"TrainStreams state: {key} was {state.get(key)} when saved, is {getattr(self, key)} now")
        by_rank = state.get("streamed_positions_by_rank")
        if by_rank is None and self._pools and self.world_size > 1:
            warnings.warn(
                "TrainStreams state holds rank 0's streamed positions only (saved without "
                "set_positions_of_all_ranks); the other ranks resume from rank 0's position, which may "
                "repeat or skip a few unlabeled records after a pass boundary",
                stacklevel=2,
            )
        positions = [tuple(p) for p in (by_rank[self.rank] if by_rank else state.get("streamed_positions", []))]
        if len(positions) != len(self._pools):
            raise ValueError("TrainStreams state: saved with a different unlabeled source (streamed vs map-style)")
        self.close()
        self.epoch, self.step, self._pool_start = state["epoch"], state["step"], positions

    def close(self) -> None:
        """Stop the workers now (they also stop when this object is garbage-collected)."""
        self._iterator = None

    def __del__(self):
        self._iterator = None


def _known_length(dataset: datasets.IterableDataset) -> int:
    splits = getattr(dataset.info, "splits", None) or {}
    split = getattr(dataset, "split", None)
    if split is not None and str(split) in splits and splits[str(split)].num_examples:
        return splits[str(split)].num_examples
    raise DatasetError(
        "TrainStreams: the streamed unlabeled dataset does not report its size; pass unlabeled_length=N "
        "(one epoch = N unlabeled samples)"
    )
