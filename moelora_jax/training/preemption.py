"""Stopping cleanly when the machine is taken away: SIGTERM or SIGINT become a request to stop at a step boundary.

Preemptible TPU VMs and cluster schedulers send SIGTERM some time before they kill a job; Ctrl-C sends SIGINT.
Inside :class:`PreemptionGuard` either signal only sets a flag; the training loop asks :meth:`~PreemptionGuard.
should_stop` after each step, writes a checkpoint and raises :class:`PreemptedError`, which ``train.py`` turns into exit
code :data:`EXIT_PREEMPTED`. One process reads its own flag at every step. Several processes must stop at the same
step, which takes a collective (an all-gather of the flags, waiting for the step to finish), so they agree only every
``check_every`` steps and at checkpoints: a notice must come at least that many steps before the machine goes. A
second SIGINT interrupts at once (``KeyboardInterrupt``), for a user who will not wait; checkpoints are written
atomically, so even that cannot corrupt the last one.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType, TracebackType

import jax

from moelora_jax.parallel.distributed import any_process

EXIT_PREEMPTED = 75
"""Exit status of a run stopped by a signal after saving its checkpoint (``EX_TEMPFAIL``: rerun to resume)."""


class PreemptedError(Exception):
    """Raised by the training loop after it saved a checkpoint in response to a signal."""

    def __init__(self, step: int, signal_name: str, checkpoint_dir: str) -> None:
        super().__init__(
            f"stopped by {signal_name} after step {step}; the checkpoint is in {checkpoint_dir}: run the same "
            "command again to resume."
        )
        self.step = step


class PreemptionGuard:
    """Context manager that records SIGTERM and SIGINT instead of dying; restores the old handlers on exit.

    Signal handlers can only be installed from the main thread; elsewhere the guard records nothing.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, check_every: int = 1) -> None:
        if check_every < 1:
            raise ValueError(f"check_every={check_every} must be at least 1.")
        self.check_every = check_every
        self.received: signal.Signals | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if signum == signal.SIGINT and self.received is not None:
            raise KeyboardInterrupt  # the second Ctrl-C: stop now
        self.received = signal.Signals(signum)

    def __enter__(self) -> PreemptionGuard:
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def should_stop(self, step: int, *, checkpointed: bool = False) -> bool:
        """Whether to stop after ``step``. One process: whether it received a signal (read locally, at every step).
        Several: at every ``check_every``-th step and after a checkpoint (``checkpointed``) whether any process
        received one, a collective all of them take at the same steps; False at the other steps."""
        if jax.process_count() > 1 and step % self.check_every and not checkpointed:
            return False
        return any_process(self.received is not None)

    @property
    def signal_name(self) -> str:
        return self.received.name if self.received is not None else "a signal on another process"
