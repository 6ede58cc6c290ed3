"""CD under DDP (through CDTrainer) and FSDP2 (fully_shard), two CPU processes with gloo."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

SCRIPTS = Path(__file__).parent / "scripts"
pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def _run(script: str, *args: str, processes: int, cwd: Path) -> None:
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes)]
        if processes > 1
        else [sys.executable]
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    result = subprocess.run(
        [*launcher, str(SCRIPTS / script), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_ddp_ranks_stay_bitwise_identical_and_match_one_process(tmp_path):
    _run("ddp_trainer_cd.py", str(tmp_path / "ddp"), "4", processes=2, cwd=tmp_path)
    _run("ddp_trainer_cd.py", str(tmp_path / "single"), "8", processes=1, cwd=tmp_path)
    rank0, rank1 = (
        load_file(tmp_path / "ddp_rank0.safetensors"),
        load_file(tmp_path / "ddp_rank1.safetensors"),
    )
    single = load_file(tmp_path / "single_rank0.safetensors")
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
        torch.testing.assert_close(rank0[name], single[name], rtol=0, atol=1e-4, msg=name)


def test_fsdp2_gathers_and_writes_back_shards_like_one_process(tmp_path):
    _run("fsdp2_cd.py", str(tmp_path / "fsdp2.safetensors"), "5.0", processes=2, cwd=tmp_path)
    _run("fsdp2_cd.py", str(tmp_path / "single.safetensors"), "5.0", processes=1, cwd=tmp_path)
    _run("fsdp2_cd.py", str(tmp_path / "no_cd.safetensors"), "0.0", processes=1, cwd=tmp_path)
    sharded, single = load_file(tmp_path / "fsdp2.safetensors"), load_file(tmp_path / "single.safetensors")
    no_cd = load_file(tmp_path / "no_cd.safetensors")
    for name in sharded:
        torch.testing.assert_close(sharded[name], single[name], rtol=0, atol=1e-4, msg=name)
    # and CD did act on the sharded run: its weights are far from a run without CD
    moved = max((single[n] - no_cd[n]).abs().max().item() for n in single if n.endswith("fc1.weight"))
    assert moved > 1e-3
