"""Reliability without a recipe run: the token never leaves the process, complete checkpoints,
the output_dir lock, NaN weights caught before the first step, the whole run's train loss."""

from __future__ import annotations

import copy
import io
import json
import logging
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import ViTForImageClassification

from conftest import tiny_vit_config
from hf_cd import CDConfig, CDTrainer, NonFiniteWeightsError
from hf_cd.training.checkpoints import checkpoint_problems, latest_complete_checkpoint
from hf_cd.training.locking import LOCK_FILE, OutputDirLock, OutputDirLockedError, holds_lock

TOKEN = "hf_PlantedTokenForTheTest0123456789"


class RandomImages(torch.utils.data.Dataset):
    def __init__(self, n: int = 48, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, 1, 28, 28, generator=generator)
        self.y = (self.x.mean(dim=(1, 2, 3)) > 0).long()

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        return {"pixel_values": self.x[i], "labels": self.y[i]}


def _trainer(output_dir: Path, model=None, **overrides) -> CDTrainer:
    torch.manual_seed(0)
    values = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=8,
        learning_rate=3e-3,
        max_steps=6,
        save_steps=3,
        logging_steps=2,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        cd_strength=5.0,
    )
    values.update(overrides)
    model = model or ViTForImageClassification(tiny_vit_config())
    return CDTrainer(model=model, args=CDConfig(**values), train_dataset=RandomImages())


# --- the Hub token -----------------------------------------------------------------------------


def test_the_token_is_in_no_repr_and_in_no_pickle_but_copies_keep_it(tmp_path):
    config = CDConfig(output_dir=str(tmp_path), hub_token=TOKEN)
    assert TOKEN not in repr(config) and TOKEN not in str(config)
    assert "<HUB_TOKEN>" in repr(config) and "cd_strength" in repr(config)
    buffer = io.BytesIO()
    torch.save(config, buffer)
    assert TOKEN.encode() not in buffer.getvalue()
    restored = pickle.loads(pickle.dumps(config))
    assert restored.hub_token is None and restored.cd_strength == config.cd_strength
    assert copy.copy(config).hub_token == TOKEN and copy.deepcopy(config).hub_token == TOKEN
    assert config.hub_token == TOKEN  # pickling did not touch the live object


def test_no_file_a_trainer_writes_holds_the_token(tmp_path):
    trainer = _trainer(tmp_path / "out", hub_token=TOKEN)
    trainer.train()
    trainer.save_model()
    trainer.save_state()
    written = [path for path in (tmp_path / "out").rglob("*") if path.is_file()]
    assert any(path.name == "training_args.bin" for path in written)
    assert [str(path) for path in written if TOKEN.encode() in path.read_bytes()] == []
    assert trainer.args.hub_token == TOKEN


# --- complete checkpoints ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run") / "out"
    _trainer(out).train()
    return out


def _copy_run(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def test_a_trainer_checkpoint_is_complete_and_each_kind_of_damage_is_named(finished_run, tmp_path):
    assert checkpoint_problems(finished_run / "checkpoint-6") == []
    damages = {
        "optimizer.pt": ("truncate0", "optimizer.pt is empty"),
        "scheduler.pt": ("delete", "scheduler.pt is missing"),
        "rng_state.pth": ("half", "rng_state.pth is cut short"),
        "model.safetensors": ("half", "model.safetensors is cut short"),
        "trainer_state.json": ("half", "trainer_state.json does not parse"),
        "training_args.bin": ("delete", "training_args.bin is missing"),
    }
    for name, (how, expected) in damages.items():
        checkpoint = _copy_run(finished_run / "checkpoint-6", tmp_path / f"damaged-{name}")
        path = checkpoint / name
        if how == "delete":
            path.unlink()
        elif how == "truncate0":
            path.write_bytes(b"")
        else:
            data = path.read_bytes()
            path.write_bytes(data[: len(data) // 2])
        assert any(expected in problem for problem in checkpoint_problems(checkpoint)), (name, expected)


def test_latest_skips_half_written_checkpoints_and_names_them(finished_run, tmp_path, caplog):
    out = _copy_run(finished_run, tmp_path / "out")
    (out / "checkpoint-6" / "optimizer.pt").write_bytes(b"")
    (out / "checkpoint-6" / "trainer_state.json").unlink()
    (out / "checkpoint-9").mkdir()  # a kill right after the directory was made
    with caplog.at_level(logging.WARNING, logger="hf_cd.training.checkpoints"):
        assert latest_complete_checkpoint(out) == str(out / "checkpoint-3")
    assert "checkpoint-9" in caplog.text and "checkpoint-6 (trainer_state.json is missing" in caplog.text
    assert "optimizer.pt is empty" in caplog.text
    assert latest_complete_checkpoint(tmp_path / "nothing-here") is None


def _as_fsdp_checkpoint(checkpoint: Path, sharded: bool) -> Path:
    """Rewrite a Trainer checkpoint into the layout FSDP (through accelerate) writes on two ranks."""
    state = load_file(checkpoint / "model.safetensors")
    (checkpoint / "model.safetensors").unlink()
    optimizer = torch.load(checkpoint / "optimizer.pt", weights_only=False)
    (checkpoint / "optimizer.pt").unlink()
    if sharded:  # SHARDED_STATE_DICT: torch.distributed.checkpoint folders
        import torch.distributed.checkpoint as dcp

        dcp.save(state, checkpoint_id=str(checkpoint / "pytorch_model_fsdp_0"))
        dcp.save({"state": {"step": torch.tensor(6)}}, checkpoint_id=str(checkpoint / "optimizer_0"))
    else:  # FULL_STATE_DICT
        torch.save(state, checkpoint / "pytorch_model_fsdp.bin")
        torch.save(optimizer, checkpoint / "optimizer.bin")
    rng = checkpoint / "rng_state.pth"
    shutil.copy(rng, checkpoint / "rng_state_0.pth")
    rng.rename(checkpoint / "rng_state_1.pth")
    return checkpoint


@pytest.mark.parametrize("sharded", [True, False], ids=["sharded", "full"])
def test_latest_recognizes_fsdp_checkpoints_and_their_damage(finished_run, tmp_path, sharded):
    out = _copy_run(finished_run, tmp_path / "out")
    _as_fsdp_checkpoint(out / "checkpoint-6", sharded)
    assert checkpoint_problems(out / "checkpoint-6") == []
    assert latest_complete_checkpoint(out) == str(out / "checkpoint-6")
    if sharded:  # the metadata file is written last: without it the shards are a half-written checkpoint
        (out / "checkpoint-6" / "pytorch_model_fsdp_0" / ".metadata").unlink()
        assert "pytorch_model_fsdp_0/.metadata is missing" in checkpoint_problems(out / "checkpoint-6")
    else:
        (out / "checkpoint-6" / "pytorch_model_fsdp.bin").write_bytes(b"")
        assert "pytorch_model_fsdp.bin is empty" in checkpoint_problems(out / "checkpoint-6")
    assert latest_complete_checkpoint(out) == str(out / "checkpoint-3")


def test_latest_recognizes_a_deepspeed_checkpoint(finished_run, tmp_path):
    checkpoint = _copy_run(finished_run / "checkpoint-6", tmp_path / "checkpoint-6")
    engine = checkpoint / "global_step6"
    engine.mkdir()
    (checkpoint / "model.safetensors").rename(engine / "mp_rank_00_model_states.pt")
    (checkpoint / "optimizer.pt").rename(engine / "bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt")
    torch.save({}, engine / "mp_rank_00_model_states.pt")  # a torch.save archive, as DeepSpeed writes
    assert checkpoint_problems(checkpoint) == []


def test_the_lock_works_where_fcntl_does_not_exist(tmp_path):
    """Windows has no fcntl: the lock is filelock's, so CDTrainer.train() runs there too."""
    script = textwrap.dedent(
        """
        import sys
        sys.modules["fcntl"] = None  # as on Windows: `import fcntl` raises ImportError
        from hf_cd.training.locking import LOCK_FILE, OutputDirLock
        from pathlib import Path
        with OutputDirLock(sys.argv[1]):
            print(Path(sys.argv[1], LOCK_FILE).read_text().strip())
        """
    )
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-1500:]
    holder = json.loads(result.stdout)
    assert set(holder) == {"pid", "host", "started", "command"}
    assert not (tmp_path / LOCK_FILE).exists()


def test_resume_true_uses_the_newest_complete_checkpoint_and_is_exact(finished_run, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    shutil.copytree(finished_run / "checkpoint-3", out / "checkpoint-3")
    shutil.copytree(finished_run / "checkpoint-6", out / "checkpoint-6")
    (out / "checkpoint-6" / "optimizer.pt").write_bytes(b"")  # the run was killed writing it
    trainer = _trainer(out)
    trainer.train(resume_from_checkpoint=True)
    expected = ViTForImageClassification.from_pretrained(finished_run / "checkpoint-6").state_dict()
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(value, expected[name]), name


def test_resume_true_without_a_checkpoint_and_a_bogus_path_say_so(tmp_path):
    with pytest.raises(ValueError, match="No valid checkpoint found"):
        _trainer(tmp_path / "empty").train(resume_from_checkpoint=True)
    with pytest.raises(ValueError, match="Can't find a valid checkpoint at"):
        _trainer(tmp_path / "empty").train(resume_from_checkpoint=str(tmp_path / "no-such-checkpoint"))


# --- train loss over the whole run ---------------------------------------------------------------


def test_train_loss_after_a_resume_covers_the_whole_run(finished_run, tmp_path):
    reference = _trainer(tmp_path / "reference").train()
    out = tmp_path / "resumed"
    out.mkdir()
    shutil.copytree(finished_run / "checkpoint-3", out / "checkpoint-3")
    resumed = _trainer(out).train(resume_from_checkpoint=str(out / "checkpoint-3"))
    assert resumed.metrics["train_steps_this_session"] == 3
    assert resumed.training_loss == pytest.approx(reference.training_loss, rel=1e-6)
    assert resumed.metrics["train_loss_this_session"] != pytest.approx(reference.training_loss, rel=1e-6)


def test_a_checkpoint_at_the_end_of_its_schedule_is_loaded_not_trained_further(finished_run, tmp_path):
    reference = _trainer(tmp_path / "reference").train()
    out = _copy_run(finished_run, tmp_path / "out")
    trainer = _trainer(out)
    output = trainer.train(resume_from_checkpoint=str(out / "checkpoint-6"))
    assert trainer.state.global_step == 6 and not (out / "checkpoint-7").exists()
    assert output.metrics["train_steps_this_session"] == 0
    assert output.training_loss == pytest.approx(reference.training_loss, rel=1e-6)
    assert trainer.cd_callback.num_updates == 6
    expected = ViTForImageClassification.from_pretrained(out / "checkpoint-6").state_dict()
    for name, value in trainer.model.state_dict().items():
        assert torch.equal(value, expected[name]), name


# --- NaN in the loaded weights -----------------------------------------------------------------


@pytest.mark.parametrize(
    "parameter",
    [
        "vit.embeddings.patch_embeddings.projection.weight",
        "vit.embeddings.cls_token",
        "classifier.weight",
        "vit.layers.1.mlp.fc2.weight",
    ],
)
def test_nan_in_the_loaded_weights_is_named_before_the_first_step(tmp_path, parameter):
    model = ViTForImageClassification(tiny_vit_config())
    parameters = dict(model.named_parameters())
    if parameter not in parameters:  # transformers 4.x names the blocks differently
        pytest.skip(f"{parameter} is not a parameter name in this transformers version")
    with torch.no_grad():
        parameters[parameter].view(-1)[:3] = float("nan")
    trainer = _trainer(tmp_path / "out", model=model, save_strategy="no")
    with pytest.raises(NonFiniteWeightsError, match="before training starts") as error:
        trainer.train()
    assert f"{parameter} (3 non-finite values)" in str(error.value)
    assert trainer.state.global_step == 0


# --- the output_dir lock -----------------------------------------------------------------------


_HOLD = textwrap.dedent(
    """
    import sys, time
    from hf_cd.training.locking import OutputDirLock
    lock = OutputDirLock(sys.argv[1]).acquire()
    print("locked", flush=True)
    time.sleep(60)
    """
)


def _holder(output_dir: Path) -> subprocess.Popen:
    process = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(output_dir)], stdout=subprocess.PIPE, text=True
    )
    assert process.stdout.readline().strip() == "locked"
    return process


def test_a_second_process_on_the_same_output_dir_is_refused_naming_the_first(tmp_path):
    holder = _holder(tmp_path)
    try:
        with pytest.raises(OutputDirLockedError, match=f"in use by pid {holder.pid} ") as error:
            OutputDirLock(tmp_path).acquire()
        assert "--output_dir" in str(error.value)
        with pytest.raises(OutputDirLockedError):  # the Trainer takes the same lock
            _trainer(tmp_path, save_strategy="no").train()
    finally:
        holder.kill()
        holder.wait()
    # SIGKILL left the lock file behind with the dead pid; it is taken over, with a warning
    assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == holder.pid
    with OutputDirLock(tmp_path):
        assert holds_lock(tmp_path)
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
        with OutputDirLock(tmp_path):  # re-entrant within one process (the recipe, then its Trainer)
            pass
        assert holds_lock(tmp_path)
    assert not holds_lock(tmp_path) and not (tmp_path / LOCK_FILE).exists()


def test_the_trainer_releases_the_lock_when_training_fails(tmp_path):
    model = ViTForImageClassification(tiny_vit_config())
    with torch.no_grad():
        model.classifier.weight.view(-1)[0] = float("nan")
    with pytest.raises(NonFiniteWeightsError):
        _trainer(tmp_path, model=model, save_strategy="no").train()
    assert not (tmp_path / LOCK_FILE).exists()
