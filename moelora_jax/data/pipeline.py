"""Training batches, from the examples a step draws to global arrays on the mesh, prepared ahead of the step.

:class:`TrainBatches` is the one path from examples to the devices: step ``n`` (from 1) draws its examples by
``(seed, n - 1)`` (:func:`~moelora_jax.data.encoding.batch_indices`), lays them out
(:class:`~moelora_jax.data.encoding.Layout`), splits the rows into ``(micro_batches, rows / micro_batches, length)``
and places them with the trainer's ``put_batch`` (each process transfers only the rows its devices hold). A batch is
thus a pure function of the seed and the step, wherever a run starts or resumes.

:class:`Prefetcher` runs such a function on a background thread a few items ahead of the consumer, so the host
packs and transfers step ``n + 1``'s batch while the devices run step ``n``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from types import TracebackType
from typing import Generic, TypeVar

import jax
import numpy as np

from moelora_jax.data.encoding import Encoded, Layout, batch_indices

T = TypeVar("T")
R = TypeVar("R")


@dataclasses.dataclass(frozen=True)
class StepBatch:
    """The batch of update ``step`` (from 1): ``arrays`` of shape ``(micro_batches, rows, length)`` on the mesh, and
    ``tokens``, the examples' own tokens (padding excluded), for throughput."""

    step: int
    arrays: dict[str, jax.Array]
    tokens: int


class TrainBatches:
    """``batches(step) -> StepBatch``: the training batch of each step, a pure function of ``(seed, step)``.

    Args:
      encoded: the training examples.
      layout: how a step's examples become rows (its row count must be a multiple of ``micro_batches``).
      pad_id: the padding token.
      batch_size: examples per step; micro_batches: how the step's rows are split for accumulation.
      seed: the data seed.
      put: places a ``(micro_batches, rows, length)`` numpy batch on the devices (``Trainer.put_batch`` with
        ``leading=1``).
    """

    def __init__(
        self,
        encoded: Sequence[Encoded],
        layout: Layout,
        pad_id: int,
        *,
        batch_size: int,
        micro_batches: int,
        seed: int,
        put: Callable[[dict[str, np.ndarray]], dict[str, jax.Array]],
    ) -> None:
        self.encoded, self.layout, self.pad_id = encoded, layout, pad_id
        self.batch_size, self.micro_batches, self.seed, self.put = batch_size, micro_batches, seed, put

    def examples(self, step: int) -> list[Encoded]:
        """The examples of update ``step`` (from 1)."""
        indices = batch_indices(len(self.encoded), self.batch_size, seed=self.seed, step=step - 1)
        return [self.encoded[i] for i in indices]

    def host(self, step: int) -> dict[str, np.ndarray]:
        """Update ``step``'s batch on the host, ``(micro_batches, rows / micro_batches, ...)`` per array."""
        return self._rows(self.examples(step))

    def _rows(self, examples: list[Encoded]) -> dict[str, np.ndarray]:
        rows = self.layout(examples, self.pad_id)
        return {k: v.reshape(self.micro_batches, -1, *v.shape[1:]) for k, v in rows.items()}

    def __call__(self, step: int) -> StepBatch:
        examples = self.examples(step)
        return StepBatch(step, self.put(self._rows(examples)), sum(len(e.tokens) for e in examples))


@dataclasses.dataclass(frozen=True)
class _Failure:
    error: BaseException


_DONE = object()


class Prefetcher(Generic[T, R]):
    """Iterates ``produce(item)`` for each of ``items``, in order, computed by one background thread at most
    ``depth`` results ahead of the consumer.

    An exception raised by ``produce`` is raised by the iteration, as itself (its traceback reaching into the
    thread), where its result would have come; the thread then stops. Use it as a context manager (or call
    :meth:`close`): leaving it stops the thread and waits for it, so it never outlives its user. The thread does
    no collective work, so processes of a multi-process job may run ahead independently.
    """

    def __init__(self, produce: Callable[[T], R], items: Iterable[T], depth: int = 2) -> None:
        if depth < 1:
            raise ValueError(f"depth={depth} must be at least 1.")
        self._queue: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._work, args=(produce, list(items)), name="moelora_jax-prefetch", daemon=True
        )
        self._thread.start()

    def _work(self, produce: Callable[[T], R], items: list[T]) -> None:
        try:
            for item in items:
                if self._stop.is_set():
                    return
                self._queue.put(produce(item))
        except BaseException as e:  # handed to the consumer, which raises it
            self._queue.put(_Failure(e))
            return
        self._queue.put(_DONE)

    def __iter__(self) -> Iterator[R]:
        while True:
            result = self._queue.get()
            if result is _DONE:
                return
            if isinstance(result, _Failure):
                raise result.error
            yield result

    def close(self) -> None:
        """Stop the thread and wait for it: it finishes the item in progress and hands over nothing more."""
        self._stop.set()
        while self._thread.is_alive():
            with contextlib.suppress(queue.Empty):  # make room for a put the thread may be blocked in
                self._queue.get(timeout=0.05)
        self._thread.join()

    def __enter__(self) -> Prefetcher[T, R]:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
