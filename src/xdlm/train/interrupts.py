"""Ctrl-C during training: stop at a step boundary, never in the middle of a step.

    with StopRequest() as stop:
        while step < steps:
            ...one whole step, its logging, validation and save...
            if stop.requested:
                break                  # the loop saves this step's state and exits

The first SIGINT only sets `requested` (a message says the step is being finished): the step in
flight (data loading, forward, backward, optimizer step, validation, a save) completes, so the
checkpoint written afterwards is that of a step boundary and `--resume` continues bit-identically.
A second SIGINT raises `KeyboardInterrupt` at once: nothing more is saved, and a save it cuts
short removes its temporary directory, so the previous checkpoint stays `latest` and intact.
Outside the main thread (where Python does not let us install a handler) Ctrl-C keeps its
default behaviour.
"""

from __future__ import annotations

import os
import signal
import threading


class StopRequest:
    """A SIGINT handler for the duration of a `with` block (module docstring)."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        # os.write to fd 2, not print: the handler may run inside a write to sys.stderr (the
        # progress bar), and a buffered stream refuses a reentrant call
        os.write(
            2,  # stderr
            b"\ninterrupt: finishing the current step, then saving a checkpoint "
            b"(Ctrl-C again stops at once; the previous checkpoint stays)\n",
        )
