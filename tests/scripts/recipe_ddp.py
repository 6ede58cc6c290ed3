"""Runs recipes/finetune.py under `accelerate launch` and writes each rank's weight fingerprint.

Used by tests/test_recipe_distributed.py: ranks that agree bit for bit write the same SHA-256.
"""

from __future__ import annotations

import faulthandler
import hashlib
import importlib.util
import json
import sys
from pathlib import Path

import torch.distributed as dist

RECIPE = Path(__file__).resolve().parents[2] / "recipes" / "finetune.py"


def load_recipe():
    spec = importlib.util.spec_from_file_location("finetune", RECIPE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def fingerprint(model) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def main(argv: list[str]) -> None:
    run = load_recipe().main(argv)
    args = run.trainer.args
    record = {
        "rank": args.process_index,
        "world_size": args.world_size,
        "global_step": run.trainer.state.global_step,
        "sha256": fingerprint(run.trainer.model),
        # the command ends its gloo group itself (a rank exiting with it alive can abort at exit)
        "process_group_alive_after_main": dist.is_initialized(),
    }
    path = Path(args.output_dir) / f"fingerprint_rank{args.process_index}.json"
    path.write_text(json.dumps(record))


if __name__ == "__main__":
    faulthandler.enable()  # an abort prints where it happened
    main(sys.argv[1:])
