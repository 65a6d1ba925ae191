"""The training loader: seeded global batches, each process's contiguous share of them, decoded
ahead by background workers, with a resumable position.

Determinism: an epoch of an indexable dataset is a permutation of its indices seeded by
(seed, epoch); a tar-shard epoch is a seeded shard order through a seeded shuffle buffer. Either
way the stream is cut into global batches of `global_batch_size` examples (the last partial one
is dropped), so the examples and their order depend only on the seed and the global batch size,
never on the number of devices or processes. Process `p` of `P` decodes positions
`[p * G / P, (p + 1) * G / P)` of each global batch. An unreadable example is replaced by the
next readable one of the same global batch (cyclically), which every process computes alike."""

from __future__ import annotations

import concurrent.futures as cf
import logging
import multiprocessing
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any, Literal, Optional, Union

import numpy as np

from ._errors import DataError
from ._open import DataConfig, Dataset, open_dataset
from ._records import DecodeSpec, Failure, RawExample, try_decode
from ._tar import TarShards

logger = logging.getLogger("codi_eqx.data")

_DONE = object()


def global_batch_size(per_device_batch: int, num_devices: int, grad_accum: int = 1) -> int:
    """Examples per optimiser step: per-device batch x devices x gradient-accumulation steps."""
    return int(per_device_batch) * int(num_devices) * int(grad_accum)


def _log_skip(name: str, message: str) -> None:
    logger.warning("skipped unreadable image %s (%s)", name, message)


class DataLoader:
    """Batches of decoded examples, deterministic for a seed, resumable.

    **Arguments:**

    - `dataset`: from `open_dataset` (indexable, or `TarShards` streamed).
    - `global_batch_size`: examples per global batch, over all devices, processes and
      accumulation steps (see `global_batch_size`).
    - `resolution`, `proportion_empty_prompts`: the transform (see `DataConfig`).
    - `seed`: fixes the order, the caption choices and the empty prompts.
    - `process_index`, `process_count`: this process's share (contiguous) of each global batch.
    - `num_workers`: background decoders (0: decode in the calling thread);
      `worker_type`: "thread" or "process"; `prefetch`: global batches decoded ahead.
    - `strict`: an unreadable image raises `DataError` naming it instead of being skipped.
    - `num_epochs`: stop after this many epochs (None: never stop).
    - `on_skip`: called with (file name, reason) for each skipped image (default: a warning
      on the `codi_eqx.data` logger).

    Iterating yields dicts: `pixel_values` float32 (B, 3, R, R) in [-1, 1],
    `conditioning_pixel_values` float32 (B, 3, R, R) in [0, 1] (conditioned data only),
    `caption` list of B strings, `index` int64 (B,), `original_size` and `crop_top_left`
    int32 (B, 2) (each image's `(height, width)` before the resize and the crop's `(top,
    left)`: SDXL's micro-conditioning), with B = global batch / process_count.
    Iteration starts at the position of `state_dict()` (see `load_state_dict`), which advances
    as batches are handed out."""

    def __init__(
        self,
        dataset: Dataset,
        *,
        global_batch_size: int,
        resolution: int,
        seed: int = 0,
        proportion_empty_prompts: float = 0.0,
        process_index: int = 0,
        process_count: int = 1,
        num_workers: int = 0,
        worker_type: Literal["thread", "process"] = "thread",
        prefetch: int = 2,
        strict: bool = False,
        num_epochs: Optional[int] = None,
        on_skip: Optional[Callable[[str, str], None]] = None,
    ):
        if global_batch_size <= 0:
            raise DataError(f"global batch size must be positive (got {global_batch_size})")
        if process_count <= 0 or not 0 <= process_index < process_count:
            raise DataError(f"process {process_index} of {process_count}: not a valid process")
        if global_batch_size % process_count:
            raise DataError(f"global batch size {global_batch_size} does not divide over "
                            f"{process_count} processes")
        if worker_type not in ("thread", "process"):
            raise DataError(f"worker_type must be 'thread' or 'process' (got {worker_type!r})")
        self.dataset = dataset
        self.streaming = isinstance(dataset, TarShards)
        self.global_batch_size = int(global_batch_size)
        self.local_batch_size = self.global_batch_size // process_count
        self.process_index = int(process_index)
        self.process_count = int(process_count)
        self.spec = DecodeSpec(int(resolution), int(seed), float(proportion_empty_prompts))
        self.seed = int(seed)
        self.num_workers = int(num_workers)
        self.worker_type = worker_type
        self.prefetch = max(1, int(prefetch))
        self.strict = strict
        self.num_epochs = num_epochs
        self.on_skip = on_skip or _log_skip
        self.skipped = 0
        self.skipped_names: list[str] = []
        self._epoch = 0
        self._batch = 0
        if not self.streaming and len(dataset) < self.global_batch_size:
            raise DataError(f"the dataset has {len(dataset)} examples, fewer than one global "
                            f"batch of {self.global_batch_size}")

    @classmethod
    def from_config(cls, config: DataConfig, **kwargs: Any) -> "DataLoader":
        """`open_dataset(config)` with the transform options of `config`; `kwargs` as for
        the constructor (`global_batch_size`, `seed`, ...)."""
        return cls(open_dataset(config), resolution=config.resolution,
                   proportion_empty_prompts=config.proportion_empty_prompts, **kwargs)

    @property
    def conditioned(self) -> bool:
        """Whether batches carry `conditioning_pixel_values`."""
        return self.dataset.conditioned

    @property
    def steps_per_epoch(self) -> Optional[int]:
        """Global batches per epoch (None for streamed tar shards, whose length is unknown)."""
        return None if self.streaming else len(self.dataset) // self.global_batch_size

    # --- resumable position -------------------------------------------------------------

    def state_dict(self) -> dict:
        """The position of the next batch: {epoch, batch_in_epoch, seed, global_batch_size}."""
        return {"epoch": self._epoch, "batch_in_epoch": self._batch, "seed": self.seed,
                "global_batch_size": self.global_batch_size}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state` (from `state_dict`) at the next iteration."""
        if int(state.get("seed", self.seed)) != self.seed:
            raise DataError(f"the data position was saved with seed {state['seed']}, "
                            f"not {self.seed}")
        saved_gbs = int(state.get("global_batch_size", self.global_batch_size))
        if saved_gbs != self.global_batch_size:
            raise DataError(f"the data position was saved with global batch size {saved_gbs}, "
                            f"not {self.global_batch_size}")
        self._epoch = int(state["epoch"])
        self._batch = int(state["batch_in_epoch"])

    # --- the order ------------------------------------------------------------------------

    def _global_batches(self, epoch: int, start: int) -> Iterator[tuple[int, list]]:
        """(batch number, items) for `epoch` from batch `start`; items are dataset indices
        (indexable) or `RawExample`s (streamed)."""
        g = self.global_batch_size
        if not self.streaming:
            perm = np.random.default_rng([self.seed, epoch, 3]).permutation(len(self.dataset))
            for b in range(start, len(self.dataset) // g):
                yield b, [int(i) for i in perm[b * g:(b + 1) * g]]
            return
        stream = self.dataset.iter_raw(self.seed, epoch)
        for _ in range(start * g):  # resume: read past what was used, decoding nothing
            if next(stream, None) is None:
                return
        b = start
        while True:
            items = [raw for _, raw in zip(range(g), stream)]
            if len(items) < g:
                return
            yield b, items
            b += 1

    def _raw(self, item: Union[int, RawExample]) -> RawExample:
        return item if isinstance(item, RawExample) else self.dataset.raw(item)

    def _positions(self) -> range:
        lo = self.process_index * self.local_batch_size
        return range(lo, lo + self.local_batch_size)

    def _epochs(self) -> Iterator[int]:
        e = self._epoch
        while self.num_epochs is None or e < self.num_epochs:
            yield e
            e += 1

    def _jobs(self, submit) -> Iterator[tuple]:
        """(epoch, batch number, items, pending results of this process's share)."""
        start = self._batch
        for epoch in self._epochs():
            for b, items in self._global_batches(epoch, start):
                pending = [submit(self._raw(items[k]), epoch) for k in self._positions()]
                yield epoch, b, items, pending
            start = 0

    # --- assembly -------------------------------------------------------------------------

    def _resolve(self, result, k: int, epoch: int, items: list) -> dict:
        """The example for position `k`: its own, or the next readable one of the batch."""
        g = self.global_batch_size
        for step in range(g):
            if step:
                result = try_decode(self._raw(items[(k + step) % g]), self.spec, epoch)
            if not isinstance(result, Failure):
                return result
            if self.strict:
                raise DataError(f"unreadable image {result.name}: {result.message}")
            self.skipped += 1
            if len(self.skipped_names) < 100:
                self.skipped_names.append(result.name)
            self.on_skip(result.name, result.message)
        raise DataError(f"every example of global batch starting at {self._raw(items[0]).name} "
                        "is unreadable")

    def _collate(self, examples: list[dict]) -> dict:
        batch = {
            "pixel_values": np.stack([e["pixel_values"] for e in examples]),
            "caption": [e["caption"] for e in examples],
            "index": np.asarray([e["index"] for e in examples], dtype=np.int64),
            "original_size": np.stack([e["original_size"] for e in examples]),
            "crop_top_left": np.stack([e["crop_top_left"] for e in examples]),
        }
        if self.conditioned:
            batch["conditioning_pixel_values"] = np.stack(
                [e["conditioning_pixel_values"] for e in examples])
        return batch

    def _advance(self, epoch: int, b: int) -> None:
        self._epoch, self._batch = epoch, b + 1
        if self.steps_per_epoch is not None and self._batch >= self.steps_per_epoch:
            self._epoch, self._batch = epoch + 1, 0

    def __iter__(self) -> Iterator[dict]:
        if self.num_workers <= 0:
            for epoch, b, items, pending in self._jobs(
                    lambda raw, epoch: try_decode(raw, self.spec, epoch)):
                examples = [self._resolve(r, k, epoch, items)
                            for k, r in zip(self._positions(), pending)]
                self._advance(epoch, b)
                yield self._collate(examples)
            return
        yield from self._iter_background()

    def _executor(self) -> cf.Executor:
        if self.worker_type == "process":
            return cf.ProcessPoolExecutor(self.num_workers,
                                          mp_context=multiprocessing.get_context("spawn"))
        return cf.ThreadPoolExecutor(self.num_workers, thread_name_prefix="codi-data")

    def _iter_background(self) -> Iterator[dict]:
        jobs: queue.Queue = queue.Queue(maxsize=self.prefetch)
        stop = threading.Event()
        executor = self._executor()

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    jobs.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def produce() -> None:
            try:
                for job in self._jobs(
                        lambda raw, epoch: executor.submit(try_decode, raw, self.spec, epoch)):
                    if not put(job):
                        return
                put(_DONE)
            except BaseException as e:  # noqa: BLE001 - handed to the consumer
                put(e)

        producer = threading.Thread(target=produce, name="codi-data-producer", daemon=True)
        producer.start()
        try:
            while True:
                job = jobs.get()
                if job is _DONE:
                    return
                if isinstance(job, BaseException):
                    raise job
                epoch, b, items, pending = job
                examples = [self._resolve(f.result(), k, epoch, items)
                            for k, f in zip(self._positions(), pending)]
                self._advance(epoch, b)
                yield self._collate(examples)
        finally:
            stop.set()
            while True:  # unblock the producer and drop what it decoded ahead
                try:
                    job = jobs.get_nowait()
                except queue.Empty:
                    break
                if isinstance(job, tuple):
                    for f in job[3]:
                        f.cancel()
            producer.join(timeout=5)
            executor.shutdown(wait=False, cancel_futures=True)
