"""Fault injection on the recipe, in the spirit of transformers' TrainerResumeTrainingTest.

A subprocess recipe run is SIGKILLed at seeded random points (between steps, or half-way through
writing a checkpoint file); ``--resume_from_checkpoint latest`` must then skip any half-written
checkpoint and finish with weights bitwise equal to an uninterrupted run. Also here: the planted
Hub token in no file, the quantized rows of a re-run reused, corrupt images skipped on request,
and two runs on one output_dir refused.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import requires_fashion_mnist
from data_fixtures import random_imagefolder
from hf_cd.training.locking import LOCK_FILE, OutputDirLockedError

ROOT = Path(__file__).resolve().parents[1]
PAUSED = ROOT / "tests" / "scripts" / "recipe_paused.py"

TINY = [
    "--model_preset", "vit_tiny", "--hidden_size", "32", "--num_hidden_layers", "2",
    "--num_attention_heads", "2", "--image_size", "28", "--patch_size", "7", "--num_channels", "1",
    "--use_cpu", "true", "--report_to", "none", "--disable_tqdm", "true", "--dataloader_pin_memory", "false",
    "--seed", "0", "--learning_rate", "3e-3", "--cd_strength", "5", "--per_device_train_batch_size", "16",
    "--max_eval_samples", "16", "--max_test_samples", "16", "--diagnostics_samples", "4",
]  # fmt: skip
RUN = [
    *TINY, "--dataset_name", "fashion_mnist", "--max_train_samples", "64", "--max_steps", "8",
    "--save_steps", "2", "--hidden_dropout_prob", "0.1", "--no_quant_eval",
]  # fmt: skip


def _finetune_main(argv):
    import importlib.util

    spec = importlib.util.spec_from_file_location("finetune", ROOT / "recipes" / "finetune.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main(argv)


def _same_weights(expected: Path, actual: Path) -> None:
    want, got = load_file(expected / "model.safetensors"), load_file(actual / "model.safetensors")
    assert want.keys() == got.keys()
    different = [name for name in want if not torch.equal(want[name], got[name])]
    assert different == [], f"{len(different)} of {len(want)} tensors differ: {different[:5]}"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("straight") / "out"
    _finetune_main([*RUN, "--output_dir", str(out)])
    return out


def _run_until_paused(output_dir: Path, pause: str, extra: tuple[str, ...] = ()) -> int:
    """Start the recipe in a subprocess, wait until it pauses at ``pause``, SIGKILL it; its pid."""
    env = {**os.environ, "HF_CD_TEST_PAUSE": pause, "PYTHONPATH": str(ROOT / "src")}
    env["OMP_NUM_THREADS"] = str(torch.get_num_threads())  # the same float sums as the uninterrupted run
    process = subprocess.Popen(
        [sys.executable, str(PAUSED), *extra, *RUN, "--output_dir", str(output_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )
    try:
        for line in process.stdout:
            if line.strip() == "PAUSED":
                break
        else:
            pytest.fail(f"the run ended (rc {process.wait()}) without reaching {pause}")
        process.send_signal(signal.SIGKILL)
    finally:
        process.kill()
        process.wait()
    return process.pid


def kill_points(seed: int, count: int) -> list[str]:
    """Seeded random points: a step, and where in it (before the next step, or half-way through one of
    that step's checkpoint files; checkpoints are written every 2 steps)."""
    places = ("train", "optimizer", "scheduler", "trainer_state")
    return random.Random(seed).sample([f"{step}:{where}" for step in (4, 6) for where in places], count)


@pytest.mark.slow
@requires_fashion_mnist
@pytest.mark.parametrize("pause", kill_points(seed=16, count=3))
def test_sigkill_anywhere_then_resume_latest_ends_bitwise_equal(uninterrupted, tmp_path, pause, caplog):
    out = tmp_path / "killed"
    dead_pid = _run_until_paused(out, pause)
    step, where = pause.split(":")
    if where != "train":  # killed inside checkpoint-<step>'s files: that one is incomplete
        assert (out / f"checkpoint-{step}").is_dir()
        assert not (out / f"checkpoint-{step}" / "trainer_state.json").is_file() or where == "trainer_state"
    assert json.loads((out / LOCK_FILE).read_text())["pid"] == dead_pid  # left behind by SIGKILL

    run = _finetune_main([*RUN, "--output_dir", str(out), "--resume_from_checkpoint", "latest"])
    resumed_from = Path(run.results["training"]["resumed_from"])
    newest_complete = int(step) - 2 if where != "train" else int(step)
    assert resumed_from.name == f"checkpoint-{newest_complete}"
    if where != "train":
        assert "Skipping incomplete checkpoint(s)" in caplog.text and f"checkpoint-{step} (" in caplog.text
    assert run.results["training"]["global_step"] == 8
    _same_weights(uninterrupted, out)
    straight = json.loads((uninterrupted / "results.json").read_text())["training"]
    assert run.results["training"]["train_loss"] == pytest.approx(straight["train_loss"], rel=1e-6)
    assert not (out / LOCK_FILE).exists()


@requires_fashion_mnist
def test_truncated_files_in_the_newest_checkpoint_are_skipped(uninterrupted, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    for step in (4, 6):
        shutil.copytree(uninterrupted / f"checkpoint-{step}", out / f"checkpoint-{step}")
    weights = out / "checkpoint-6" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])  # the page cache lost the file's tail
    run = _finetune_main([*RUN, "--output_dir", str(out), "--resume_from_checkpoint", "latest"])
    assert run.results["training"]["resumed_from"] == str(out / "checkpoint-4")
    _same_weights(uninterrupted, out)


def test_resume_messages_for_a_bogus_path_no_checkpoint_and_only_broken_ones(tmp_path, capsys):
    (tmp_path / "c" / "checkpoint-2").mkdir(parents=True)
    cases = [
        ("a", str(tmp_path / "nope"), "is not a directory"),
        ("b", "latest", "holds no checkpoint-* directory"),
        ("c", "latest", "holds only incomplete checkpoints (checkpoint-2"),
    ]
    for output_dir, resume, needle in cases:
        with pytest.raises(SystemExit):  # the CLI turns RecipeArgumentError into one line and exit code 2
            _finetune_main(
                [*RUN, "--output_dir", str(tmp_path / output_dir), "--resume_from_checkpoint", resume]
            )
        assert needle in capsys.readouterr().err, needle


# --- token, quantized rows, corrupt images, a second run ---------------------------------------------

TOKEN = "hf_PlantedTokenForTheFaultTest0123456789"


@requires_fashion_mnist
def test_no_file_or_log_of_a_recipe_run_holds_the_token_and_a_rerun_reuses_its_quantized_rows(
    tmp_path, caplog, capsys
):
    out = tmp_path / "out"
    argv = [
        *TINY, "--dataset_name", "fashion_mnist", "--max_train_samples", "32", "--max_steps", "2",
        "--save_steps", "1", "--quant_pipelines", "minmax", "per_tensor", "--quant_bits", "W8A8",
        "--quant_num_calibration", "8", "--output_dir", str(out), "--hub_token", TOKEN,
    ]  # fmt: skip
    first = _finetune_main(argv)
    written = [path for path in out.rglob("*") if path.is_file()]
    assert {"training_args.bin", "README.md", "results.json", "trainer_state.json"} <= {
        p.name for p in written
    }
    assert [str(p) for p in written if TOKEN.encode() in p.read_bytes()] == []
    captured = capsys.readouterr()
    assert TOKEN not in caplog.text + captured.out + captured.err
    assert first.results["quantized"]["reused_rows"] == 0

    caplog.clear()
    again = _finetune_main([*argv, "--resume_from_checkpoint", "latest"])  # nothing left to train
    assert again.results["training"]["global_step"] == 2 and not (out / "checkpoint-3").exists()
    assert again.results["training"]["train_steps_this_session"] == 0
    assert again.results["training"]["train_loss"] == pytest.approx(first.results["training"]["train_loss"])
    assert again.results["quantized"]["reused_rows"] == 2 and "2 of 2 rows were already in" in caplog.text
    accuracies = [r["accuracy"] for r in first.results["quantized"]["rows"]]
    assert [r["accuracy"] for r in again.results["quantized"]["rows"]] == accuracies


@pytest.mark.slow
@requires_fashion_mnist
def test_no_file_left_by_a_sigkilled_run_holds_the_token(tmp_path):
    """The token given on the command line is in no file under output_dir, the lock file included,
    also when the run was killed and could not clean up after itself."""
    out = tmp_path / "killed"
    _run_until_paused(out, "2:trainer_state", ("--hub_token", TOKEN))  # first: the lock notes 500 characters
    written = [path for path in out.rglob("*") if path.is_file()]
    assert LOCK_FILE in {p.name for p in written} and "training_args.bin" in {p.name for p in written}
    assert [str(p) for p in written if TOKEN.encode() in p.read_bytes()] == []


def _imagefolder_with_a_corrupt_image(root: Path) -> Path:
    random_imagefolder(root, {"train": 12, "test": 4})
    (root / "train" / "a" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    return root


def test_skip_corrupt_images_reaches_the_loader_from_the_recipe(tmp_path):
    data = _imagefolder_with_a_corrupt_image(tmp_path / "images")
    run = _finetune_main(
        [*TINY, "--dataset_name", str(data), "--dataset_cache_dir", str(tmp_path / "cache"), "--max_steps", "1",
         "--no_quant_eval", "--save_strategy", "no", "--skip_corrupt_images", "true",
         "--output_dir", str(tmp_path / "out")]
    )  # fmt: skip
    assert run.results["dataset"]["corrupt_images_skipped"] == {"train": 1}


_HOLD = textwrap.dedent(
    """
    import sys, time
    from hf_cd.training.locking import OutputDirLock
    OutputDirLock(sys.argv[1]).acquire()
    print("locked", flush=True)
    time.sleep(60)
    """
)


def test_a_second_recipe_run_on_a_busy_output_dir_is_refused_before_any_work(tmp_path, capsys):
    holder = subprocess.Popen([sys.executable, "-c", _HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(SystemExit) as exit_:  # one line and exit status 2, as every user error
            _finetune_main([*RUN, "--output_dir", str(tmp_path)])
        assert exit_.value.code == 2 and f"in use by pid {holder.pid} " in capsys.readouterr().err
        with pytest.raises(OutputDirLockedError, match=f"in use by pid {holder.pid} "):
            _finetune_main([*RUN, "--output_dir", str(tmp_path), "--debug"])
    finally:
        holder.kill()
        holder.wait()
