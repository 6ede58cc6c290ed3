"""Runs recipes/finetune.py, pausing forever at one chosen point so that a test can SIGKILL it there.

Used by tests/test_fault_injection.py. ``HF_CD_TEST_PAUSE=<step>:<where>`` chooses the point:

- ``train``: before optimizer step ``<step>`` + 1 runs (between checkpoints);
- ``optimizer`` / ``scheduler``: half-way through writing checkpoint-<step>'s ``optimizer.pt`` /
  ``scheduler.pt`` (the first half of the bytes is on disk, the rest never comes);
- ``trainer_state``: half-way through writing checkpoint-<step>'s ``trainer_state.json``, the last file.

When paused it prints ``PAUSED`` on stdout. Test-only: nothing in hf_cd knows about it.
"""

from __future__ import annotations

import importlib.util
import io
import os
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers.trainer_callback import TrainerState

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "finetune.py"
STEP, WHERE = os.environ["HF_CD_TEST_PAUSE"].split(":")
STEP = int(STEP)


def pause() -> None:
    print("PAUSED", flush=True)
    while True:
        time.sleep(60)


def half_write(path: str, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data[: len(data) // 2])
        handle.flush()
        os.fsync(handle.fileno())
    pause()


def in_checkpoint(path) -> bool:
    return Path(str(path)).parent.name == f"checkpoint-{STEP}"


original_save = torch.save


def save(obj, f, *args, **kwargs):
    if isinstance(f, (str, os.PathLike)) and Path(f).name == f"{WHERE}.pt" and in_checkpoint(f):
        buffer = io.BytesIO()
        original_save(obj, buffer, *args, **kwargs)
        half_write(str(f), buffer.getvalue())
    return original_save(obj, f, *args, **kwargs)


torch.save = save

original_save_to_json = TrainerState.save_to_json


def save_to_json(self, json_path):
    if WHERE == "trainer_state" and in_checkpoint(json_path):
        import dataclasses
        import json

        half_write(
            json_path, (json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n").encode()
        )
    return original_save_to_json(self, json_path)


TrainerState.save_to_json = save_to_json

original_training_step = transformers.Trainer.training_step


def training_step(self, *args, **kwargs):
    if WHERE == "train" and self.state.global_step == STEP:
        pause()
    return original_training_step(self, *args, **kwargs)


transformers.Trainer.training_step = training_step

spec = importlib.util.spec_from_file_location("finetune", RECIPE)
finetune = importlib.util.module_from_spec(spec)
spec.loader.exec_module(finetune)
finetune.main(sys.argv[1:])
