"""Running model work off the main thread while that thread keeps the Python GIL (no Qt here).

Inside 3D Slicer the main (GUI) thread holds the GIL all the time it sits in the Qt event loop:
PythonQt's init never releases it and Slicer never enables PythonQt's thread support
(docs/SLICER.md, "Threading", with the sources). A worker thread polled by a timer therefore
runs only in the instants the main thread executes Python, and a 0.4 s click takes seconds.

:class:`JobRunner` is the design SlicerNNInteractive uses for the same reason: one persistent
worker thread runs the computation while the main thread *waits* in
``threading.Event.wait(WAIT_S)``, which releases the GIL, and pumps the event loop between
waits with an injected ``pump`` (in Slicer:
``slicer.app.processEvents(qt.QEventLoop.ExcludeUserInputEvents)``, so that views repaint and
timers run while user input is held back by Qt and delivered afterwards, in order).

Anything that still reaches :meth:`JobRunner.request` while a job is in flight (a timer, an
MRML observer, or input delivered by a pump that does not exclude it) is deferred and run
after the job, in the order it came.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable, List, TypeVar

__all__ = ["JobRunner", "WAIT_S"]

T = TypeVar("T")

#: Seconds the main thread sleeps in ``Event.wait`` between two pumps of the event loop.
WAIT_S = 0.02


class JobRunner:
    """One persistent worker thread and a main thread that waits for it without holding the GIL.

    Args:
        pump: called on the main thread between waits (processes pending non-input events).
        wait_s: seconds of each ``Event.wait`` (the GIL is free meanwhile).

    Attributes:
        busy: True while a job runs (the main thread is inside :meth:`run`).
    """

    def __init__(self, pump: Callable[[], None], wait_s: float = WAIT_S) -> None:
        self._pump = pump
        self._wait_s = float(wait_s)
        self._jobs: "queue.Queue[tuple]" = queue.Queue()
        self._deferred: List[Callable[[], None]] = []
        self._draining = False
        self.busy = False
        # Persistent, not one thread per job: torch keeps thread-local caches and thread pools.
        self._thread = threading.Thread(target=self._work, name="OAIMSSegment worker", daemon=True)
        self._thread.start()

    def _work(self) -> None:
        while True:
            compute, box, done = self._jobs.get()
            try:
                box["result"] = compute()
            except BaseException as error:  # raised again on the main thread by run()
                box["error"] = error
            done.set()

    def run(self, compute: Callable[[], T]) -> T:
        """Main thread: run ``compute()`` on the worker and return its result (or raise its error),
        pumping the event loop until it is done. Not re-entrant: a pumped event that needs the
        worker goes through :meth:`request`."""
        if self.busy:
            raise RuntimeError("JobRunner.run is not re-entrant; use request() from event handlers")
        box: dict = {}
        done = threading.Event()
        self.busy = True
        try:
            self._jobs.put((compute, box, done))
            while not done.wait(self._wait_s):  # releases the GIL: the worker runs at full speed
                self._pump()
        finally:
            self.busy = False
        if "error" in box:
            raise box["error"]
        return box["result"]

    def request(self, action: Callable[[], None]) -> None:
        """Main thread: run ``action()`` now, or, when a job is in flight (this call came through
        the pump), after it and after the actions deferred before it, in order."""
        self._deferred.append(action)
        if self.busy or self._draining:
            return
        self._draining = True
        try:
            while self._deferred:
                self._deferred.pop(0)()
        finally:
            self._draining = False

    @property
    def deferred(self) -> int:
        """Actions waiting for the job in flight."""
        return len(self._deferred)
