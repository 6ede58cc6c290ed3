"""Writing files safely: whole or not at all, never over what hf-cd did not write.

Why one module: every command that writes (the recipe, ``hf_cd.quant``, ``hf_cd.export``,
``hf_cd.pretrained``, the model card) follows the same two rules. A file appears through a
temporary file in the same folder and `os.replace`, so a kill or a failed check leaves the old file
or nothing, never half a file that looks finished. And a path is replaced only when it is ours:
a folder when it is empty or carries our marker, a file when a check says hf-cd wrote it. The
current directory and its parents are never replaced. Every check runs before the work starts.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path


class OutputPathError(ValueError):
    """An output path that hf-cd must not (or cannot) write: the message names it and the fix."""


def _is_cwd_or_parent(path: Path) -> bool:
    resolved, cwd = path.resolve(), Path.cwd().resolve()
    return resolved == cwd or resolved in cwd.parents


def check_replaceable_dir(path: str | os.PathLike, marker: str, what: str = "--output") -> Path:
    """Refuse a folder we would replace unless it is absent, empty, or holds our ``marker`` file.

    Also refuses the current directory and its parents (replacing them would delete the caller's
    work, ``.git`` included), and a path that is a file. Returns the path.
    """
    path = Path(path).expanduser()
    if _is_cwd_or_parent(path):
        raise OutputPathError(
            f"{what} {str(path)!r} is the current directory or one of its parents, which this command would "
            "replace: give a new folder, e.g. checkpoints/NAME."
        )
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise OutputPathError(f"{what} {str(path)!r} exists and is not a folder: give a new folder.")
    if path.is_dir() and any(path.iterdir()) and not (path / marker).is_file():
        raise OutputPathError(
            f"{what} {str(path)!r} is a folder with files that hf-cd did not write (no {marker}); it would be "
            "replaced. Give an empty or new folder, or move those files away."
        )
    check_writable_dir(path.parent, what)
    return path


def check_writable_dir(folder: str | os.PathLike, what: str = "--output") -> None:
    """Refuse a folder that cannot be created or written: a file on the way, or no permission."""
    folder = Path(folder).expanduser()
    existing = folder
    while not existing.exists():
        if existing.is_symlink():  # a dangling link
            raise OutputPathError(f"{what}: {str(existing)!r} is a broken symbolic link.")
        existing = existing.parent
    if not existing.is_dir():
        raise OutputPathError(
            f"{what}: {str(existing)!r} is a file, not a folder, so nothing can be written under it: give "
            "another path."
        )
    if not os.access(existing, os.W_OK | os.X_OK):
        raise OutputPathError(f"{what}: cannot write into {str(existing)!r} (permission denied).")


def check_output_file(
    path: str | os.PathLike, what: str = "--output", ours: Callable[[Path], bool] | None = None
) -> Path:
    """Refuse an output file path before any work: a folder, a path under a file, an unwritable folder,
    or (with ``ours``) an existing file that hf-cd did not write. Returns the path."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise OutputPathError(f"{what} {str(path)!r} is a folder: give a file path, e.g. {path / 'out'}.")
    check_writable_dir(path.parent, what)
    if path.exists() and ours is not None and not ours(path):
        raise OutputPathError(
            f"{what} {str(path)!r} exists and was not written by hf-cd; it would be overwritten. Give a new "
            "file name, or move that file away."
        )
    return path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path``, on error it is removed.

    The caller writes (and checks) the temporary file; a kill or an exception leaves ``path`` as it was.
    The file gets the permissions a plain ``open`` would give it (umask), not mkstemp's 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, name = tempfile.mkstemp(
        prefix=f".{path.name}.", suffix=".tmp" + (path.suffix if suffix is None else suffix), dir=path.parent
    )
    os.close(descriptor)
    tmp = Path(name)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()  # ours: the temporary file this function made
        raise


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write ``text`` to ``path`` whole or not at all (temporary file in the same folder + `os.replace`)."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "w", encoding=encoding) as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    return path


@contextlib.contextmanager
def staged_files(folder: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty hidden folder inside ``folder``; on success each file written there replaces its
    namesake in ``folder`` (`os.replace`: whole), and the staging folder is removed either way.

    For writers that take a folder (``save_pretrained``): a kill leaves old files or new ones, never a
    half-written ``model.safetensors``, and nothing in ``folder`` is deleted that the writer did not write.
    """
    import shutil

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".hf_cd-staging-", dir=folder))
    try:
        yield staging
        for source in sorted(staging.rglob("*")):
            if source.is_file():
                target = folder / source.relative_to(staging)
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(source, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # ours: made above, emptied by the moves
