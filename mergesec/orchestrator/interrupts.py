"""SIGINT and SIGTERM during a run: stop Ray Tune gracefully, remember which signal came.

Ray Tune ends its loop on SIGINT or SIGUSR1 (its own handlers) and returns from ``fit()`` as if
the run were complete; SIGTERM has no handler and kills the driver without cleanup. ``Interrupts``
routes both signals to Tune's graceful stop (its SIGUSR1 handler, installed while ``fit()`` runs)
and records the first one, so the caller can tell an interrupted run from a finished one and exit
128 + signal (130 for SIGINT, 143 for SIGTERM). A second signal, or one that arrives while Tune is
not running, raises ``KeyboardInterrupt`` at once.
"""

from __future__ import annotations

import os
import signal
from types import FrameType, TracebackType

HANDLED = (signal.SIGINT, signal.SIGTERM)
EXIT_INTERRUPTED = {signal.SIGINT: 130, signal.SIGTERM: 143}


class Interrupts:
    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}
        self._env: str | None = None

    @property
    def exit_code(self) -> int:
        """128 + the first signal received (130 when none was seen but the run was cut short)."""
        return 128 + (self.signum or signal.SIGINT)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else "an interrupt"

    def __enter__(self) -> Interrupts:
        # Tune would take SIGINT for itself and never tell us; its SIGUSR1 handler does the same
        # graceful stop, and we call that one.
        self._env = os.environ.get("TUNE_DISABLE_SIGINT_HANDLER")
        os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"
        for s in HANDLED:
            self._previous[s] = signal.getsignal(s)
            signal.signal(s, self._handle)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)  # type: ignore[arg-type]
        if self._env is None:
            os.environ.pop("TUNE_DISABLE_SIGINT_HANDLER", None)
        else:
            os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = self._env

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        first = self.signum is None
        if first:
            self.signum = signum
            stop = signal.getsignal(signal.SIGUSR1) if hasattr(signal, "SIGUSR1") else None
            if callable(stop):
                stop(signal.SIGUSR1, frame)  # Tune's graceful stop while fit() runs
                return
        raise KeyboardInterrupt
