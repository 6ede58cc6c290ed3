"""What every benchmark records beside its numbers: date, commit, device and the exact command."""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import platform
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from hf_cd.files import atomic_write_text

RESULTS_DIR = Path(__file__).parent / "results"


def _git(*args: str, cwd: Path | None = None) -> str:
    try:
        return subprocess.run(
            ["git", *args], capture_output=True, text=True, check=True, cwd=cwd or Path(__file__).parent
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def device_description(device: str) -> str:
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.device(device))
        return f"{props.name} ({props.total_memory / 2**30:.0f} GiB), CUDA {torch.version.cuda}"
    return f"CPU: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def tree_is_dirty(cwd: Path | None = None) -> bool:
    """Whether tracked code differs from HEAD. Records under bench/results/ do not count: a suite that
    appends its own records as it goes stays at a clean commit."""
    pathspec = ("--", ":(top)", ":(top,exclude)bench/results")
    return bool(_git("status", "--porcelain", "--untracked-files=no", *pathspec, cwd=cwd))


def require_clean_tree(allow_dirty: bool = False, cwd: Path | None = None) -> None:
    """Refuse to record a benchmark from uncommitted code (its commit could not reproduce it)."""
    if not allow_dirty and tree_is_dirty(cwd):
        raise SystemExit(
            "The working tree has uncommitted changes, so this record's commit would not reproduce it: "
            "commit (or stash) them first, or pass --allow-dirty to record a `-dirty` commit on purpose."
        )


def parse_checked(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse a benchmark's arguments with ``--allow-dirty`` added, refusing a dirty tree before any work.

    Why here and not when the record is written: a benchmark can run for hours, and its record would
    then be refused (or carry a `-dirty` commit nobody can check out) only at the end.
    """
    parser.add_argument(
        "--allow-dirty",
        action="store_true",
        help="record from a tree with uncommitted changes (the record's commit then ends in -dirty)",
    )
    args = parser.parse_args(argv)
    require_clean_tree(args.allow_dirty)
    return args


def in_percent(results: dict) -> dict:
    """A recipe ``results.json`` with its accuracies in percent, as every record here holds them.

    Why: results.json follows the Hub's convention (fractions in [0, 1], ``accuracy_unit: fraction``);
    the benchmark records kept percent, so a new record stays comparable with the earlier ones.
    """
    if results.get("accuracy_unit") != "fraction":
        return results
    from hf_cd.quant.results import rows_as_percent

    results = dict(results, accuracy_unit="percent")
    for key in ("test", "validation"):
        if isinstance(results.get(key), dict) and results[key].get("accuracy") is not None:
            results[key] = dict(results[key], accuracy=100 * results[key]["accuracy"])
    quantized = results.get("quantized")
    if isinstance(quantized, dict) and quantized.get("rows"):
        results["quantized"] = dict(quantized, rows=rows_as_percent(quantized["rows"]))
    return results


def environment(device: str) -> dict:
    import torch
    import transformers

    commit = _git("rev-parse", "HEAD")
    dirty = tree_is_dirty()
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit + ("-dirty" if dirty else ""),
        "device": device_description(device),
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def record_header(record: dict) -> str:
    """The markdown lines every record opens with: date, commit, device and exact command."""
    return "\n".join(f"- **{key}**: `{record[key]}`" for key in ("date", "commit", "device", "command"))


def write_result(name: str, device: str, payload: dict, markdown: str) -> tuple[Path, Path]:
    """Write ``bench/results/<name>-<date>-<device>.{json,md}``; returns both paths."""
    env = environment(device)
    stem = f"{name}-{env['date'][:10]}-{'gpu' if device.startswith('cuda') else 'cpu'}"
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    json_path, md_path = RESULTS_DIR / f"{stem}.json", RESULTS_DIR / f"{stem}.md"
    atomic_write_text(json_path, json.dumps({**env, **payload}, indent=2) + "\n")  # whole or not at all
    atomic_write_text(md_path, f"# {name}\n\n{record_header(env)}\n\n{markdown.strip()}\n")
    return json_path, md_path
