"""Stopping cleanly when the machine is taken away: SIGTERM or SIGINT become a request to stop at a step boundary.

Preemptible TPU VMs and cluster schedulers send SIGTERM some time before they kill a job; Ctrl-C sends SIGINT.
Inside :class:`PreemptionGuard` either signal only sets a flag; the training loop asks :meth:`~PreemptionGuard.
should_stop` after each step, writes a checkpoint and raises :class:`PreemptedError`, which ``train.py`` turns into exit
code :data:`EXIT_PREEMPTED`. A second SIGINT interrupts at once (``KeyboardInterrupt``), for a user who will not
wait; checkpoints are written atomically, so even that cannot corrupt the last one.
"""

from __future__ import annotations

import signal
import threading
from types import FrameType, TracebackType

from moelora_jax.distributed import any_process

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

    def __init__(self) -> None:
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

    def should_stop(self) -> bool:
        """Whether any process received a signal. With several processes this is a collective (all agree on the
        step at which to stop), so every process must call it at the same step."""
        return any_process(self.received is not None)

    @property
    def signal_name(self) -> str:
        return self.received.name if self.received is not None else "a signal on another process"
