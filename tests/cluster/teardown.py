"""Tear down test services however the test process ends (shared by the control plane,
the node agent and the Prometheus helper).

Each service calls `track(self)` when it starts and `untrack(self)` when it stops; at exit
or on SIGTERM/SIGHUP every tracked service's `stop()` runs, then the signal's previous
handling. SIGINT needs nothing here: KeyboardInterrupt unwinds context managers, fixture
finalizers and atexit. Child processes started with `preexec_fn=die_with_parent` are
killed by the kernel even when the test process is SIGKILLed.
"""

from __future__ import annotations

import atexit
import ctypes
import os
import signal
import threading
import weakref
from typing import Any

_LIVE: "weakref.WeakSet[Any]" = weakref.WeakSet()
_handlers_installed = False


def stop_all() -> None:
    for service in list(_LIVE):
        try:
            service.stop()
        except Exception:
            pass


def _install_handlers() -> None:
    global _handlers_installed
    if _handlers_installed:
        return
    _handlers_installed = True
    atexit.register(stop_all)
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in (signal.SIGTERM, signal.SIGHUP):
        previous = signal.getsignal(sig)

        def handler(signum, frame, previous=previous):
            stop_all()
            if callable(previous):
                previous(signum, frame)
            else:
                signal.signal(signum, signal.SIG_DFL)
                os.kill(os.getpid(), signum)

        signal.signal(sig, handler)


def track(service: Any) -> None:
    """Stop `service` (anything with a `stop()`) if the process ends while it runs."""
    _install_handlers()
    _LIVE.add(service)


def untrack(service: Any) -> None:
    _LIVE.discard(service)


def die_with_parent() -> None:
    """preexec_fn: runs in the child between fork and exec."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGKILL))  # PR_SET_PDEATHSIG
    except Exception:
        pass
