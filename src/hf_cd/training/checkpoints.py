"""Which ``checkpoint-*`` directories a run can resume from: the newest *complete* one.

Why not `transformers.trainer_utils.get_last_checkpoint`: it returns the highest-numbered
directory, even one that a killed run left half-written (a 0-byte ``optimizer.pt``, no
``trainer_state.json``), and resuming from it dies deep inside the Trainer. The Trainer writes a
checkpoint in a fixed order (weights and ``training_args.bin``, then optimizer, scheduler and RNG
state, then ``trainer_state.json``), so a checkpoint is complete when every one of those files is
there, none is empty or cut short, and ``trainer_state.json`` parses.
"""

from __future__ import annotations

import json
import logging
import os
import re
import struct
import zipfile
from pathlib import Path

logger = logging.getLogger(__name__)

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE = "trainer_state.json"
TRAINING_ARGS = "training_args.bin"
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "adapter_model.safetensors",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
    "adapter_model.bin",
)
"""Any one of these holds the model (an index names its shards, which must be there too)."""
FSDP_WEIGHT_FILE = re.compile(r"^pytorch_model_fsdp(_\d+)?(_rank\d+)?\.bin$")
"""FSDP's full (``pytorch_model_fsdp.bin``) and local (``..._rank0.bin``) state dicts, as accelerate names them."""
FSDP_WEIGHT_DIR = re.compile(r"^pytorch_model_fsdp_\d+$")
"""FSDP's sharded state dict: a torch.distributed.checkpoint folder (``.metadata`` + ``*.distcp``)."""
OPTIMIZER_FILE = re.compile(r"^(optimizer(_\d+)?(_rank\d+)?\.(pt|bin)|rank\d+-of-\d+-optimizer\.pt)$")
"""The Trainer's ``optimizer.pt``, accelerate's FSDP ``optimizer.bin`` / ``optimizer_0_rank0.bin``, TP's shards."""
DEEPSPEED_DIR = re.compile(r"^global_step\d+$")
"""DeepSpeed's engine checkpoint: ``*model_states.pt`` and ``*optim_states.pt`` files."""


def current_umask() -> int:
    """The process umask (reading it means setting it, so it is set straight back)."""
    umask = os.umask(0)
    os.umask(umask)
    return umask


def respect_umask(
    folder: str | os.PathLike, pattern: str = "*.safetensors", include_folder: bool = False
) -> None:
    """Give weight files the mode every other file gets (0644 under the usual umask 022).

    Why: safetensors writes through a private temporary file, so ``model.safetensors`` lands with
    mode 0600 while ``config.json`` beside it gets 0644, and a shared or served folder cannot be read.
    ``include_folder`` also opens the folder itself (one made by `tempfile.mkdtemp` is 0700).
    """
    umask = current_umask()
    for path in Path(folder).glob(pattern):
        if path.is_file():
            os.chmod(path, 0o666 & ~umask)
    if include_folder:
        os.chmod(folder, 0o777 & ~umask)


def checkpoint_dirs(output_dir: str | os.PathLike) -> list[Path]:
    """The ``checkpoint-<step>`` directories of ``output_dir``, oldest step first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [
        (int(match.group(1)), path)
        for path in root.iterdir()
        if path.is_dir() and (match := CHECKPOINT_PATTERN.match(path.name))
    ]
    return [path for _, path in sorted(found)]


def _torch_file_problem(path: Path) -> str | None:
    """A ``torch.save`` file is a zip archive: one cut short has no end-of-archive record."""
    if not zipfile.is_zipfile(path):
        return f"{path.name} is cut short (not a complete torch.save archive)"
    return None


def _safetensors_problem(path: Path) -> str | None:
    """A safetensors file starts with its header's length; a file shorter than the header says is cut short."""
    with path.open("rb") as handle:
        head = handle.read(8)
        if len(head) < 8:
            return f"{path.name} is cut short"
        (header_size,) = struct.unpack("<Q", head)
        header = handle.read(header_size)
    if len(header) < header_size:
        return f"{path.name} is cut short (header incomplete)"
    try:
        entries = json.loads(header)
    except ValueError:
        return f"{path.name} has an unreadable header"
    data_end = max(
        (entry["data_offsets"][1] for key, entry in entries.items() if key != "__metadata__"), default=0
    )
    if path.stat().st_size < 8 + header_size + data_end:
        return f"{path.name} is cut short ({path.stat().st_size} bytes, needs {8 + header_size + data_end})"
    return None


def _file_problem(path: Path) -> str | None:
    if not path.is_file():
        return f"{path.name} is missing"
    if path.stat().st_size == 0:
        return f"{path.name} is empty"
    if path.suffix in (".pt", ".pth", ".bin"):
        return _torch_file_problem(path)
    if path.suffix == ".safetensors":
        return _safetensors_problem(path)
    return None


def _distributed_checkpoint_problems(folder: Path) -> list[str]:
    """A torch.distributed.checkpoint folder is complete once its ``.metadata`` (written last) is there."""
    problems = []
    if problem := _file_problem(folder / ".metadata"):
        problems.append(f"{folder.name}/{problem}")
    shards = sorted(folder.glob("*.distcp"))
    if not shards:
        problems.append(f"{folder.name} holds no *.distcp shards")
    problems.extend(f"{folder.name}/{p}" for shard in shards if (p := _file_problem(shard)))
    return problems


def _deepspeed_problems(checkpoint: Path, pattern: str, what: str) -> list[str] | None:
    """Problems of DeepSpeed's ``global_step*`` files matching ``pattern``; ``None`` if there is no such folder."""
    folders = [p for p in checkpoint.iterdir() if p.is_dir() and DEEPSPEED_DIR.match(p.name)]
    if not folders:
        return None
    files = [path for folder in folders for path in sorted(folder.glob(pattern))]
    if not files:
        return [f"{folders[0].name} holds no {what}"]
    return [f"{path.parent.name}/{p}" for path in files if (p := _file_problem(path))]


def _weight_problems(checkpoint: Path) -> list[str]:
    present = [name for name in WEIGHT_FILES if (checkpoint / name).exists()]
    fsdp_files = sorted(p for p in checkpoint.iterdir() if p.is_file() and FSDP_WEIGHT_FILE.match(p.name))
    fsdp_dirs = sorted(p for p in checkpoint.iterdir() if p.is_dir() and FSDP_WEIGHT_DIR.match(p.name))
    deepspeed = _deepspeed_problems(checkpoint, "*model_states.pt", "model states")
    if not present and not fsdp_files and not fsdp_dirs and deepspeed is None:
        return [f"no model weights ({' / '.join(WEIGHT_FILES[:3])}, or FSDP's pytorch_model_fsdp*)"]
    problems = [p for path in fsdp_files if (p := _file_problem(path))]
    for folder in fsdp_dirs:
        problems.extend(_distributed_checkpoint_problems(folder))
    problems.extend(deepspeed or [])
    for name in present:
        problem = _file_problem(checkpoint / name)
        if problem is None and name.endswith(".index.json"):
            try:
                shards = set(json.loads((checkpoint / name).read_text())["weight_map"].values())
            except (ValueError, KeyError, TypeError):
                problem = f"{name} does not parse"
            else:
                problems.extend(p for shard in sorted(shards) if (p := _file_problem(checkpoint / shard)))
        if problem:
            problems.append(problem)
    return problems


def _optimizer_problems(checkpoint: Path) -> list[str]:
    problems = []
    optimizer = [path for path in checkpoint.iterdir() if path.is_file() and OPTIMIZER_FILE.match(path.name)]
    sharded = [path for path in checkpoint.iterdir() if path.is_dir() and path.name.startswith("optimizer")]
    deepspeed = _deepspeed_problems(checkpoint, "*optim_states.pt", "optimizer states")
    if not optimizer and not sharded and deepspeed is None:
        problems.append("optimizer.pt is missing")
    problems.extend(p for path in optimizer if (p := _file_problem(path)))
    for folder in sharded:  # FSDP's sharded optimizer: a torch.distributed.checkpoint folder
        problems.extend(_distributed_checkpoint_problems(folder))
    problems.extend(deepspeed or [])
    problems.extend(p for name in ("scheduler.pt",) if (p := _file_problem(checkpoint / name)))
    rng = sorted(checkpoint.glob("rng_state*.pth"))
    if not rng:
        problems.append("rng_state.pth is missing")
    problems.extend(p for path in rng if (p := _file_problem(path)))
    return problems


def checkpoint_problems(checkpoint: str | os.PathLike, *, expect_optimizer: bool = True) -> list[str]:
    """Why ``checkpoint`` cannot be resumed from (empty when it is complete).

    ``expect_optimizer=False`` is for runs with ``save_only_model``, whose checkpoints hold no
    optimizer, scheduler or RNG state.
    """
    checkpoint = Path(checkpoint)
    if not checkpoint.is_dir():
        return [f"{checkpoint} is not a directory"]
    problems = []
    state = checkpoint / TRAINER_STATE
    problem = _file_problem(state)
    if problem is None:
        try:
            parsed = json.loads(state.read_text())
            if not isinstance(parsed, dict) or "global_step" not in parsed:
                problem = f"{TRAINER_STATE} has no global_step"
        except ValueError:
            problem = f"{TRAINER_STATE} does not parse"
    if problem:
        problems.append(problem)
    problems.extend(_weight_problems(checkpoint))
    if problem := _file_problem(checkpoint / TRAINING_ARGS):
        problems.append(problem)
    if expect_optimizer:
        problems.extend(_optimizer_problems(checkpoint))
    problems.extend(
        f"{path.name} is empty"
        for path in sorted(checkpoint.iterdir())
        if path.is_file() and path.stat().st_size == 0 and f"{path.name} is empty" not in problems
    )
    return problems


def latest_complete_checkpoint(output_dir: str | os.PathLike, *, expect_optimizer: bool = True) -> str | None:
    """The newest complete ``checkpoint-*`` of ``output_dir`` (``None`` if there is none).

    Newer, incomplete ones (a run killed while writing them) are skipped with a warning that names
    each and says what is wrong with it; they are left on disk, untouched.
    """
    skipped = []
    for checkpoint in reversed(checkpoint_dirs(output_dir)):
        problems = checkpoint_problems(checkpoint, expect_optimizer=expect_optimizer)
        if not problems:
            if skipped:
                logger.warning(
                    "Skipping incomplete checkpoint(s) (a run was interrupted while writing them): %s. "
                    "Resuming from %s instead.",
                    "; ".join(skipped),
                    checkpoint,
                )
            return str(checkpoint)
        skipped.append(f"{checkpoint.name} ({', '.join(problems)})")
    if skipped:
        logger.warning("Every checkpoint in %s is incomplete: %s.", output_dir, "; ".join(skipped))
    return None
