"""One run per ``output_dir``: a lock file holding the pid of the run that writes there.

Two runs writing checkpoints, weights and ``results.json`` into one directory interleave their
files without any error. The lock is an OS file lock (``flock``) on ``output_dir/_hf_cd.lock``,
so the kernel releases it when its process dies, even by SIGKILL: a lock file left behind by a
dead run is simply taken over. The file also records the pid, host and command (with the values of
secret flags such as ``--hub_token`` hidden), so the error names the other run. (The leading underscore keeps it out of the Trainer's Hub uploads.)
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import socket
import sys
import time
from pathlib import Path

from hf_cd.errors import redact, redacted_argv

logger = logging.getLogger(__name__)

LOCK_FILE = "_hf_cd.lock"

_held: dict[str, tuple[int, int]] = {}
"""Locks this process holds: real path → (file descriptor, how many times taken)."""


class OutputDirLockedError(RuntimeError):
    """Another live process is writing into the same ``output_dir``."""


def _describe_holder(path: Path) -> str:
    try:
        holder = json.loads(path.read_text() or "{}")
    except (OSError, ValueError):
        holder = {}
    if not holder:
        return "another process (its lock file holds no pid yet)"
    started = holder.get("started")
    since = (
        f", running since {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(started))}" if started else ""
    )
    command = f": {holder['command']}" if holder.get("command") else ""
    return redact(f"pid {holder.get('pid')} on {holder.get('host', '?')}{since}{command}")


def _previous_holder(fd: int) -> dict:
    try:
        raw = os.pread(fd, 1 << 16, 0)
        return json.loads(raw or b"{}")
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
        import fcntl

        self.output_dir.mkdir(parents=True, exist_ok=True)
        key = os.path.realpath(self.path)
        if key in _held:
            fd, count = _held[key]
            _held[key] = (fd, count + 1)
            self._key = key
            return self
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                os.close(fd)
                if error.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise
                raise OutputDirLockedError(
                    f"{self.output_dir} is in use by {_describe_holder(self.path)}. Two runs writing into one "
                    "output_dir would mix their checkpoints and results: wait for that run to finish (or stop "
                    "it), or pass another --output_dir."
                ) from None
            # The previous holder may have removed the file between our open and our flock: then we
            # hold a lock on a file nobody else can see; start again on the new one.
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        previous = _previous_holder(fd)
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
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        _held[key] = (fd, 1)
        self._key = key
        return self

    def release(self) -> None:
        if self._key is None or self._key not in _held:
            return
        fd, count = _held[self._key]
        if count > 1:
            _held[self._key] = (fd, count - 1)
        else:
            del _held[self._key]
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)  # while still locked, so no one locks the old file after us
            os.close(fd)
        self._key = None

    def __enter__(self) -> OutputDirLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def holds_lock(output_dir: str | os.PathLike) -> bool:
    """Whether this process holds the lock on ``output_dir``."""
    return os.path.realpath(Path(output_dir) / LOCK_FILE) in _held
