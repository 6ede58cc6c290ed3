"""recipes/finetune.py under `accelerate launch` with two CPU processes (gloo DDP)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import requires_fashion_mnist

SCRIPT = Path(__file__).parent / "scripts" / "recipe_ddp.py"
pytestmark = [pytest.mark.slow, pytest.mark.distributed, requires_fashion_mnist]


def run_recipe_on_two_processes(out: Path, *extra: str) -> None:
    """The recipe's tiny preset under `accelerate launch` with two CPU processes; ``extra`` adds flags."""
    # `--cpu --num_processes 2` would need mpirun (accelerate's multi-CPU launcher) and otherwise runs ONE
    # process; `--multi_gpu` is accelerate's torchrun launcher, and `--use_cpu true` keeps it on the CPU (gloo).
    launcher = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
    ]  # fmt: skip
    recipe_args = [
        "--model_preset", "vit_tiny", "--hidden_size", "32", "--num_hidden_layers", "2", "--num_attention_heads", "2",
        "--image_size", "28", "--patch_size", "7", "--num_channels", "1", "--output_dir", str(out), "--use_cpu", "true",
        "--max_steps", "4", "--per_device_train_batch_size", "8", "--max_train_samples", "64",
        "--max_eval_samples", "32", "--max_test_samples", "40", "--eval_strategy", "steps", "--eval_steps", "2",
        "--save_steps", "2", "--hidden_dropout_prob", "0.1", "--learning_rate", "3e-3", "--cd_strength", "5",
        "--report_to", "none", "--disable_tqdm", "true", "--dataloader_pin_memory", "false", "--seed", "0",
        "--quant_pipelines", "minmax", "--quant_bits", "W8A8", "--quant_num_calibration", "8",
        "--quant_max_eval_samples", "16", "--diagnostics_samples", "4", *extra,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    try:
        result = subprocess.run(
            [*launcher, str(SCRIPT), *recipe_args],
            env=env,
            cwd=out.parent,
            capture_output=True,
            text=True,
            timeout=600,
        )
    except subprocess.TimeoutExpired as timeout:  # say which rank got how far, not just "timed out"
        finished = sorted(path.name for path in out.glob("fingerprint_rank*.json"))
        output = [  # bytes even with text=True (the subprocess docs), or None
            (stream.decode(errors="replace") if isinstance(stream, bytes) else stream or "")[-2000:]
            for stream in (timeout.stdout, timeout.stderr)
        ]
        pytest.fail(f"the two-process run hung; ranks that finished main: {finished}\n" + "\n".join(output))
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_two_process_cpu_run_completes_and_the_ranks_agree(tmp_path):
    out = tmp_path / "ddp"
    run_recipe_on_two_processes(out)

    ranks = [json.loads((out / f"fingerprint_rank{rank}.json").read_text()) for rank in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2]
    assert ranks[0]["global_step"] == ranks[1]["global_step"] == 4
    assert ranks[0]["sha256"] == ranks[1]["sha256"]  # CD acted identically on both replicas
    assert [r["process_group_alive_after_main"] for r in ranks] == [False, False]

    results = json.loads((out / "results.json").read_text())  # written once, by rank 0
    assert results["training"]["world_size"] == 2 and results["training"]["global_step"] == 4
    assert results["test"]["accuracy"] is not None and results["dataset"]["test_samples"] == 40
    assert (out / "model.safetensors").is_file() and (out / "checkpoint-4").is_dir()
