"""The training loop: updates dispatched back to back, the host preparing the next batch and reading results late.

What the host does at each step, and when it waits for the devices:

- Step ``n + 1``'s batch is drawn, laid out and transferred by a background thread
  (:class:`~moelora_jax.data.pipeline.Prefetcher`) while step ``n`` runs; the loop takes it from a queue.
- The step is dispatched (JAX returns at once; the devices queue it behind the previous one) and its metrics stay on
  the devices. Those of a logged step (every ``train.log_every`` steps, and the last) are fetched once the *next*
  step has been dispatched, so the wait overlaps that step: the devices always have work queued. The skipped-update
  check reads the fetched values, so it too runs a step late.
- One process reads its stop flag locally at every step; several agree on a stop every ``train.stop_check_every``
  steps and at checkpoints (a collective, :class:`~moelora_jax.training.preemption.PreemptionGuard`).
- Evaluations, checkpoint saves and a stop do wait for the devices; the records held back are written first, so the
  log covers every step up to a checkpoint before it is saved. They are also written at the end and at an error.

All of the loop's reads from the devices go through :func:`~moelora_jax.parallel.distributed.fetch`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterator
from typing import Any

from tqdm.auto import tqdm

from moelora_jax.data.pipeline import Prefetcher
from moelora_jax.errors import UserError
from moelora_jax.parallel.distributed import fetch, is_primary
from moelora_jax.training.job import Job
from moelora_jax.training.preemption import PreemptedError, PreemptionGuard
from moelora_jax.training.run_log import record_values
from moelora_jax.training.trainer import TrainState


@dataclasses.dataclass(frozen=True)
class Training:
    """What one attempt's loop did: ``seconds`` of training (evaluations excluded) over ``tokens`` example tokens."""

    seconds: float
    tokens: int


def check_skipped(skipped: int, steps: int, planned: int, fraction: float) -> None:
    """Stop a run whose updates are (nearly) all non-finite rather than let it report success: ``skipped`` of the
    ``steps`` updates done so far (of ``planned``) may exceed ``fraction`` only before 10 (or all planned) are done."""
    if steps >= min(10, planned) and skipped > fraction * steps:
        raise UserError(
            f"{skipped} of this run's {steps} updates had a non-finite loss or gradient and were skipped "
            f"(more than train.max_skipped_fraction={fraction}): the adapters are not training. Lower optim.lr, use "
            "model.dtype=float32, or check the data and the model files."
        )


class _TrainRecords:
    """The ``train`` records of a job's loop, written late: :meth:`hold` keeps a logged step's metrics on the
    devices, :meth:`write` fetches and writes the one held (and checks the skipped updates against it)."""

    def __init__(self, job: Job, bar: tqdm, planned: int) -> None:
        self.job, self.bar, self.planned = job, bar, planned
        self.tokens, self._held = 0, None
        self._start, self._paused = time.perf_counter(), 0.0

    def seconds(self) -> float:
        """Training time so far: wall time since the loop began, less the pauses (:meth:`paused`)."""
        return time.perf_counter() - self._start - self._paused

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Time spent inside (evaluations) does not count as training."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self._paused += time.perf_counter() - start

    def hold(self, step: int, metrics: dict[str, Any]) -> None:
        self._held = (step, metrics, self.tokens)

    def write(self) -> None:
        """Write the record held back, if any: waits for its step only."""
        if self._held is None:
            return
        (step, metrics, tokens), self._held = self._held, None
        values = record_values(fetch(metrics))
        skipped = int(values.pop("skipped"))
        job, t = self.job, self.job.settings.train
        rate = tokens / self.seconds()
        lr = float(job.learning_rates[step - 1])
        self.bar.set_postfix(loss=f"{values['loss']:.3f}", lr=f"{lr:.2e}", tok_s=f"{rate:.0f}")
        job.log.write({"event": "train", "step": step, **values, "lr": lr, "tokens_per_s": rate, "skipped": skipped})
        check_skipped(skipped - job.first_skipped, step - job.first_step, self.planned, t.max_skipped_fraction)


def train_loop(job: Job, state: TrainState) -> tuple[TrainState, Training]:
    """Train ``state`` from ``job.first_step`` to ``train.steps``: the step-0 evaluation of a fresh run, then every
    update with its records, periodic evaluations and checkpoints (the last step's included). Returns the final
    state and the time it took. Raises :class:`PreemptedError` after checkpointing when signalled to stop."""
    t, every = job.settings.train, job.settings.checkpoint.every
    if job.first_step == 0 and t.eval_before:
        job.log.write({"event": "eval", **job.evaluate(state.adapters, 0)})
    steps = range(job.first_step + 1, t.steps + 1)
    bar = tqdm(desc="train", total=t.steps, initial=job.first_step, dynamic_ncols=True, disable=not is_primary())
    records = _TrainRecords(job, bar, planned=len(steps))
    push = job.output.push if is_primary() else lambda: None
    saved = job.first_step
    with bar, PreemptionGuard(t.stop_check_every) as guard, Prefetcher(job.batches, steps) as batches:
        try:
            for batch in batches:
                step = batch.step
                state, metrics = job.trainer.train_step(state, job.params, batch.arrays)
                bar.update()
                records.write()  # the previous step's, while this one runs
                records.tokens += batch.tokens
                if step % t.log_every == 0 or step == t.steps:
                    records.hold(step, metrics)
                evaluating = bool(t.eval_every) and step % t.eval_every == 0 and step != t.steps
                checkpointing = step == t.steps or bool(every and step % every == 0)
                if evaluating or checkpointing:
                    records.write()
                if evaluating:
                    with records.paused():
                        job.log.write({"event": "eval", **job.evaluate(state.adapters, step)})
                if checkpointing:
                    job.checkpoints.save(state, step=step)
                    saved = step
                    push()
                if step != t.steps and guard.should_stop(step, checkpointed=checkpointing):
                    records.write()
                    if saved != step:
                        job.checkpoints.save(state, step=step)
                    job.checkpoints.close()
                    job.log.close()
                    push()
                    raise PreemptedError(step, guard.signal_name, str(job.checkpoints.directory))
        except BaseException:
            with contextlib.suppress(Exception):  # what failed may fail the fetch too; the first error is the one
                records.write()
            raise
    job.checkpoints.close()  # the last step saved (and its record written) above; a run resumed at its end has none
    return state, Training(records.seconds(), records.tokens)
