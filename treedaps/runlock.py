"""One run per folder: ``<run>/.lock`` names the pid, host and start time of the run writing there.

The lock file is created with ``O_CREAT | O_EXCL`` (atomic, also on NFS v3+), so of two runs
started into the same folder exactly one gets it; the other refuses with one line naming the
holder. A lock whose pid is no longer alive on this host was left by a killed run: it is reported
and taken over. A lock from another host cannot be checked from here, so the run refuses and says
which file to delete if that run is dead. The holding process itself may lock again (a notebook
that builds two experiments on one folder). Under ``torchrun`` only rank 0 locks: the other ranks
share its folder (``RunDir.check_or_init(write=is_main)``).
"""
from __future__ import annotations

import atexit
import json
import logging
import os
import socket
import time
from pathlib import Path

log = logging.getLogger("treedaps")

YOUNG_S = 10.0   # an unreadable lock younger than this is still being written by its creator


class RunLocked(RuntimeError):
    """Another live run holds the folder (one-line message naming it)."""


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (signal 0 checks without sending)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:   # exists, owned by someone else
        return True
    return True


class RunLock:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.held = False
        self._registered = False
        self.started = time.time()

    def _me(self) -> dict:
        return dict(pid=os.getpid(), host=socket.gethostname(),
                    started=time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(self.started)))

    def _holder(self) -> dict | None:
        """The lock's content, or None when it cannot be read (being written, or garbage)."""
        try:
            holder = json.loads(self.path.read_text())
            return holder if isinstance(holder, dict) and isinstance(holder.get("pid"), int) else None
        except (OSError, ValueError):
            return None

    def _stale_reason(self, holder: dict | None) -> str | None:
        """Why the existing lock may be taken over, or None when its holder may still be running."""
        if holder is None:
            try:
                age = time.time() - self.path.stat().st_mtime
            except FileNotFoundError:
                return "gone"
            return f"unreadable lock file ({age:.0f} s old)" if age > YOUNG_S else None
        if holder.get("host") != socket.gethostname():
            return None
        if holder["pid"] == os.getpid():
            return "ours"
        return None if pid_alive(holder["pid"]) else f"pid {holder['pid']} is not running any more"

    def acquire(self) -> None:
        """Create the lock, take over a stale one, or raise ``RunLocked`` naming the holder."""
        self.started = time.time()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except FileExistsError:
                holder = self._holder()
                reason = self._stale_reason(holder)
                if reason is None:
                    raise RunLocked(self._refusal(holder)) from None
                if reason not in ("ours", "gone"):
                    log.warning("taking over the lock of an interrupted run in %s (%s; started %s)",
                                self.path.parent, reason, (holder or {}).get("started", "?"))
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(self._me(), f)
            if not self._registered:   # a killed run leaves it; a normal exit removes it
                atexit.register(self.release)
                self._registered = True
            self.held = True
            return
        raise RunLocked(f"{self.path.parent} is being locked by another run at the same moment; try again")

    def _refusal(self, holder: dict | None) -> str:
        where = self.path.parent
        if holder is None:
            return f"{where} is being locked by another run that is starting now ({self.path})"
        who = f"pid {holder['pid']} on host {holder.get('host')}, started {holder.get('started')}"
        if holder.get("host") == socket.gethostname():
            return (f"{where} is in use by another run ({who}); wait for it to finish "
                    f"or choose another name=... (if pid {holder['pid']} is no run, delete {self.path})")
        return (f"{where} is in use by another run ({who}) that cannot be checked from this host; "
                f"if that run is dead, delete {self.path}")

    def release(self) -> None:
        """Remove the lock if it is still ours (idempotent)."""
        if not self.held:
            return
        self.held = False
        holder = self._holder()
        if holder and holder.get("pid") == os.getpid() and holder.get("host") == socket.gethostname():
            self.path.unlink(missing_ok=True)
