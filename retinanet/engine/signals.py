"""Stopping a training run cleanly: SIGTERM (how clusters preempt jobs) and SIGINT (Ctrl-C) ask
the trainer to finish the current step, write a checkpoint and exit, instead of killing it
between checkpoints. A second signal of the same kind while the first is pending acts as usual
(the process dies), for when the clean stop is not wanted."""

from __future__ import annotations

import signal
import threading
from types import FrameType

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


class TrainingInterrupted(RuntimeError):
    """Training stopped on request after writing a checkpoint; `--resume` continues it."""

    def __init__(self, message: str, signal_number: int) -> None:
        super().__init__(message)
        self.exit_code = 128 + signal_number  # the shell's convention for a signal's death


class StopSignals:
    """Context manager that turns SIGTERM and SIGINT into a flag while active (in the main
    thread only; elsewhere signals cannot be caught and it does nothing).

        with StopSignals() as signals:
            ... if signals.requested(): save and stop ...
    """

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def requested(self) -> bool:
        return self.received is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.received).name if self.received else "no signal"

    def _handle(self, number: int, frame: FrameType | None) -> None:
        if self.received == number:  # asked twice: give up the clean stop
            signal.signal(number, self._previous.get(number, signal.SIG_DFL))
            signal.raise_signal(number)
            return
        self.received = number
        print(
            f"received {signal.Signals(number).name}: stopping after the current step with a "
            "checkpoint (send it again to stop at once)",
            flush=True,
        )

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for number in STOP_SIGNALS:
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()
