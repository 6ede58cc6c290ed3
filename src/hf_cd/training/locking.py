"""One run per ``output_dir``: an OS file lock, and a note that names the run holding it.

Two runs writing checkpoints, weights and ``results.json`` into one directory interleave their
files without any error. The lock is `filelock.FileLock` on ``output_dir/_hf_cd.lock.flock``:
``flock`` on Linux and macOS, ``msvcrt`` locking on Windows, so `CDTrainer` runs everywhere; the
OS releases it when its process dies, even by SIGKILL, so a lock left by a dead run is simply taken
over. Beside it, ``_hf_cd.lock`` notes the holder's pid, host and command (with the values of
secret flags such as ``--hub_token`` hidden), so the error names the other run. The note is a
separate file because a lock file's bytes cannot be read while it is locked on Windows. On release
the note is removed; the empty ``.flock`` file stays, as removing a lock file others may be opening
would let two runs hold "the" lock at once. (The leading underscore keeps both out of the Trainer's
Hub uploads.)
"""

from __future__ import annotations

import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

from filelock import FileLock, Timeout

from hf_cd.errors import redact, redacted_argv

logger = logging.getLogger(__name__)

LOCK_FILE = "_hf_cd.lock"
"""The holder note (JSON: pid, host, started, command)."""
OS_LOCK_FILE = "_hf_cd.lock.flock"
"""The file the OS lock is taken on."""

_held: dict[str, tuple[FileLock, int]] = {}
"""Locks this process holds: real path → (the lock, how many times taken)."""


class OutputDirLockedError(RuntimeError):
    """Another live process is writing into the same ``output_dir``."""


def _describe_holder(path: Path) -> str:
    try:
        holder = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        holder = {}
    if not holder:
        return "another process (its lock note names no pid yet)"
    started = holder.get("started")
    since = (
        f", running since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(started))}" if started else ""
    )
    command = f": {holder['command']}" if holder.get("command") else ""
    return redact(f"pid {holder.get('pid')} on {holder.get('host', '?')}{since}{command}")


def _previous_holder(path: Path) -> dict:
    try:
        return json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        return {}


class OutputDirLock:
    """Hold the lock on ``output_dir`` for the duration of a ``with`` block (re-entrant in one process).

    Raises `OutputDirLockedError` naming the other process when a live one holds it.
    """

    def __init__(self, output_dir: str | os.PathLike):
        self.output_dir = Path(output_dir)
        self.path = self.output_dir / LOCK_FILE
        self._key: str | None = None

    def acquire(self) -> OutputDirLock:
        self.output_dir.mkdir(parents=True, exist_ok=True)
        key = os.path.realpath(self.path)
        if key in _held:
            lock, count = _held[key]
            _held[key] = (lock, count + 1)
            self._key = key
            return self
        lock = FileLock(self.output_dir / OS_LOCK_FILE, timeout=0, thread_local=False)
        try:
            lock.acquire()
        except Timeout:
            raise OutputDirLockedError(
                f"{self.output_dir} is in use by {_describe_holder(self.path)}. Two runs writing into one "
                "output_dir would mix their checkpoints and results: wait for that run to finish (or stop "
                "it), or pass another --output_dir."
            ) from None
        previous = _previous_holder(self.path)
        if previous.get("pid") not in (None, os.getpid()):
            logger.warning(
                "Taking over the lock of %s from pid %s on %s, which no longer holds it (a run that was killed).",
                self.output_dir,
                previous.get("pid"),
                previous.get("host", "?"),
            )
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.time(),
            "command": " ".join(redacted_argv(sys.argv))[:500],  # no --hub_token value on disk
        }
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps(record) + "\n")
        os.replace(tmp, self.path)  # whole or not at all: a reader never sees half a note
        _held[key] = (lock, 1)
        self._key = key
        return self

    def release(self) -> None:
        if self._key is None or self._key not in _held:
            return
        lock, count = _held[self._key]
        if count > 1:
            _held[self._key] = (lock, count - 1)
        else:
            del _held[self._key]
            self.path.unlink(missing_ok=True)  # while still locked, so no one reads our note as theirs
            lock.release()
        self._key = None

    def __enter__(self) -> OutputDirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def holds_lock(output_dir: str | os.PathLike) -> bool:
    """Whether this process holds the lock on ``output_dir``."""
    return os.path.realpath(Path(output_dir) / LOCK_FILE) in _held
