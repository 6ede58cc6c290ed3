"""The package version, in a leaf module so sub-packages read it without importing ``hf_cd`` itself."""

__version__ = "0.1.0"


def source_commit() -> str:
    """hf-cd's own git commit (``-dirty`` with local changes), or ``"unknown"``: never the caller's repository.

    Why not ``git rev-parse`` in the working directory: a command run from inside another git
    checkout would record that repository's commit as hf-cd's. The commit is read only where this
    package's files are themselves the ``src/hf_cd`` of a git checkout (an editable install).
    """
    import os
    import subprocess
    from pathlib import Path

    package = Path(__file__).resolve().parent
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}

    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(package), *args],
            capture_output=True,
            text=True,
            check=True,
            env=env,
            timeout=30,
        ).stdout.strip()

    try:
        top = Path(git("rev-parse", "--show-toplevel")).resolve()
        if (top / "src" / "hf_cd").resolve() != package:
            return "unknown"
        commit = git("rev-parse", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return commit + ("-dirty" if dirty else "")
