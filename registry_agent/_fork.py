"""Notice that an object crossed ``fork()``.

A registrar, watcher or discovery object created in a parent (a gunicorn
master, a multiprocessing parent) is copied into every child with its loop
thread, sockets and lease. In the child none of that is usable: its thread
does not exist there and the lease belongs to the parent. So the child's
``stop()``/``close()``/atexit must return at once (with a warning) instead of
waiting on a thread that will never answer.
"""

from __future__ import annotations

import logging
import os

__all__ = ["ForkGuard"]

log = logging.getLogger("registry_agent")


class ForkGuard:
    """Remembers the process that created an object; tells whether we are now in another."""

    __slots__ = ("_warned", "pid", "what")

    def __init__(self, what: str) -> None:
        self.pid = os.getpid()
        self.what = what
        self._warned = False

    def forked(self) -> bool:
        """True in a child process that inherited the object through ``fork()``."""
        return os.getpid() != self.pid

    def in_child(self, action: str) -> bool:
        """True (and a warning, once) when ``action`` is attempted in a forked child."""
        if not self.forked():
            return False
        if not self._warned:
            self._warned = True
            log.warning(
                "%s was created in process %d and crossed fork() into %d: %s does nothing "
                "here (create it after the fork, e.g. in a gunicorn post_fork hook)",
                self.what,
                self.pid,
                os.getpid(),
                action,
                extra={"event": "forked", "pid": os.getpid(), "parent": self.pid},
            )
        return True
