"""Ctrl-C (SIGINT) during a sweep: never lost, and never raised half-way through Ray's startup.

- `deferred()`: while Ray starts (a few seconds), a SIGINT is remembered instead of raised (a
  KeyboardInterrupt raised inside `ray.init` leaves Ray half started, and one raised in a callback
  of Ray's core can be swallowed there); when the block ends, it is raised as a KeyboardInterrupt,
  before anything is put in Ray's object store or any trial starts.
- `handler_kept()`: Tune installs its own SIGINT handler when a run starts (the first Ctrl-C stops
  the run and saves its state) and leaves it installed when the run ends; this puts back the
  handler from before, so a Ctrl-C after the Tune run interrupts the sweep instead of setting a
  flag of a run that is over.

Signal handlers belong to the main thread: elsewhere both do nothing.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _current_handler():
    handler = signal.getsignal(signal.SIGINT)
    return signal.default_int_handler if handler is None else handler  # None: set outside Python


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    if not _main_thread():
        yield
        return
    received: list[int] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: received.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.default_int_handler)
    if received:
        raise KeyboardInterrupt


@contextlib.contextmanager
def handler_kept() -> Iterator[None]:
    if not _main_thread():
        yield
        return
    previous = _current_handler()
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
