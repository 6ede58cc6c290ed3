"""recipes/finetune.py end to end on the real Fashion-MNIST (tiny models, a few steps), and its arguments."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import (
    AutoImageProcessor,
    AutoModelForImageClassification,
    Dinov2ForImageClassification,
    ViTForImageClassification,
)

from conftest import requires_fashion_mnist, tiny_dinov2_config, tiny_vit_config
from hf_cd import alignment_summary, measure_alignment
from hf_cd.data import FASHION_MNIST_CLASSES, UnknownDatasetError, collate_fn, load_image_dataset
from hf_cd.data.loading import subsample_stratified
from hf_cd.data.transforms import ImagePreprocessing, with_image_transforms
from hf_cd.recipe import (
    MODEL_PRESETS,
    RecipeArgumentError,
    SeededAugmentation,
    format_summary,
    parse_recipe_args,
    run_recipe,
)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "recipes" / "configs"


def load_finetune():
    spec = importlib.util.spec_from_file_location("finetune", ROOT / "recipes" / "finetune.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


TINY_PRESET = [
    "--model_preset", "vit_tiny", "--hidden_size", "32", "--num_hidden_layers", "2",
    "--num_attention_heads", "2", "--image_size", "28", "--patch_size", "7", "--num_channels", "1",
]  # fmt: skip
QUICK = [
    "--dataset_name", "fashion_mnist", "--use_cpu", "true", "--report_to", "none", "--disable_tqdm", "true",
    "--dataloader_pin_memory", "false", "--seed", "0", "--learning_rate", "3e-3", "--cd_strength", "5",
]  # fmt: skip


# --- arguments ------------------------------------------------------------------------------------


def test_config_file_sets_defaults_and_command_line_flags_override_it(tmp_path):
    config = tmp_path / "recipe.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model_preset": "vit_small",
                "output_dir": str(tmp_path / "from_yaml"),
                "learning_rate": "1e-3",  # YAML reads 1e-3 as a string; it must still become a float
                "cd_strength": 2.0,
                "cd_kinds": ["ffn"],
                "max_train_samples": 100,
                "quant_eval": False,
                "quant_bits": ["W4A4"],
                "crop_scale": [0.8, 1.0],
            }
        )
    )
    args = parse_recipe_args(
        [
            "--config",
            str(config),
            "--learning_rate",
            "5e-4",
            "--cd_kinds",
            "ffn",
            "value_output",
            "--quant_eval",
            "true",
        ]
    )
    assert args.training.learning_rate == 5e-4  # flag beats file
    assert args.training.cd_kinds == ["ffn", "value_output"]
    assert args.quant.quant_eval is True
    assert args.training.cd_strength == 2.0  # file beats default
    assert args.model.model_preset == "vit_small"
    assert args.data.max_train_samples == 100 and args.data.crop_scale == [0.8, 1.0]
    assert args.quant.bit_pairs() == [(4, 4)]
    assert args.training.output_dir == str(tmp_path / "from_yaml")
    assert args.data.flip_probability == 0.0  # neither: the dataclass default (no flips unless asked)
    assert args.training.remove_unused_columns is False

    file_only = parse_recipe_args(["--config", str(config)])
    assert file_only.training.learning_rate == 1e-3 and isinstance(file_only.training.learning_rate, float)
    assert file_only.quant.quant_eval is False and file_only.training.cd_kinds == ["ffn"]

    without_file = parse_recipe_args(["--model_preset", "vit_base", "--output_dir", str(tmp_path)])
    assert without_file.training.learning_rate == 5e-5 and without_file.training.cd_strength == 1.0


def test_help_lists_every_option_group(capsys, monkeypatch):
    from hf_cd import quant
    from hf_cd.quant.registry import PIPELINES

    class Rotation:  # a pipeline registered after hf_cd.recipe was imported must still be listed
        name, runtime = "my_rotation", "fake_quant"

        def __call__(self, model, config, calibration_images):
            return model

    monkeypatch.setitem(PIPELINES, "my_rotation", Rotation())
    with pytest.raises(SystemExit) as exit_info:
        parse_recipe_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: ") and len(text.split("\n", 1)[0]) < 100  # not 150 flags in the usage line
    headings = [
        "options:",
        "Model:",
        "Data:",
        "Colinearity Decay:",
        "Quantized evaluation:",
        "Trainer arguments:",
    ]
    positions = [text.index(f"\n{heading}\n") for heading in headings]
    assert positions == sorted(positions), "groups out of order"
    sections = dict(zip(headings, [text[a:b] for a, b in zip(positions, [*positions[1:], len(text)])]))
    expected = {
        "options:": ["--config", "--debug"],
        "Model:": ["--model_preset", "--model_name_or_path", "--image_size", "--use_lora"],
        "Data:": ["--dataset_name", "--flip_probability", "--crop_scale"],
        "Colinearity Decay:": ["--cd_strength", "--cd_kinds", "--cd_mode", "--tweo_weight"],
        "Quantized evaluation:": ["--quant_pipelines", "--quant_bits", "--quant_num_calibration"],
        "Trainer arguments:": ["--learning_rate", "--output_dir", "--num_train_epochs"],
    }
    for heading, flags in expected.items():
        for flag in flags:
            assert f"  {flag} " in sections[heading], (heading, flag)
    assert (
        "--cd_strength" not in sections["Trainer arguments:"] and "--learning_rate" not in sections["Model:"]
    )
    # the pipelines come from the registry, the bit range from hf_cd.quant
    pipelines = " ".join(sections["Quantized evaluation:"].split())
    for name in quant.available_pipelines():
        assert name in pipelines.replace("- ", "-"), name
    assert "my_rotation" in pipelines and "2..8 to quantize, or ≥ 16" in pipelines
    # one default per option: no "(default 224). (default: None)"
    assert "(default: None)" not in text
    for option in text.split("\n  --"):
        prose, _, added = " ".join(option.split()).partition("(default: ")
        assert not added or "default" not in prose.lower(), option  # the help says it, or argparse does
    assert (
        "examples:" in text
        and "fashion_mnist_vit_tiny_cpu.yaml" in text
        and "--dataset_name path/to/folder" in text
    )


def test_shipped_configs_parse(tmp_path):
    configs = sorted(CONFIGS.glob("*.yaml"))
    assert {path.name for path in configs} >= {
        "fashion_mnist_vit_tiny_cpu.yaml",
        "fashion_mnist_vit_small_gpu.yaml",
        "eurosat_vit_base.yaml",
        "fgvc_aircraft_dinov2.yaml",
        "sun397_vit_base.yaml",
    }
    for path in configs:
        # TrainingArguments refuses bf16 without a GPU at parse time; switch it off so the GPU configs parse here
        folder = ["--dataset_name", str(tmp_path)] if path.name.startswith("imagefolder") else []
        # a config that names a local checkpoint folder (`make pretrained` writes it) gets a stand-in
        # on a fresh clone, where that folder does not exist yet: parsing refuses missing folders
        local = yaml.safe_load(path.read_text()).get("model_name_or_path") or ""
        if local.startswith(("outputs/", "./", "/")) and not (Path(local) / "config.json").is_file():
            stand_in = tmp_path / "stand_in_checkpoint"
            tiny_dinov2_config().save_pretrained(stand_in)
            folder += ["--model_name_or_path", str(stand_in)]
        args = parse_recipe_args(
            ["--config", str(path), "--output_dir", str(tmp_path), "--bf16", "false", *folder]
        )
        assert args.training.cd_strength > 0, path.name
        assert args.training.save_strategy != "no", f"{path.name}: an interrupted run must be resumable"


def test_unknown_option_in_the_config_file_is_named_with_a_suggestion(tmp_path):
    config = tmp_path / "recipe.yaml"
    config.write_text("model_preset: vit_tiny\nlearnig_rate: 1.0e-3\n")
    with pytest.raises(RecipeArgumentError, match=r"learnig_rate.*did you mean 'learning_rate'"):
        parse_recipe_args(["--config", str(config)])


@pytest.mark.parametrize(
    ("argv", "error", "needle"),
    [
        (["--model_preset", "vit_huge"], RecipeArgumentError, r"Unknown model_preset 'vit_huge'.*vit_tiny, vit_small, vit_base"),
        ([], RecipeArgumentError, r"exactly one model source, got neither.*--model_name_or_path.*--model_preset"),
        (["--model_preset", "vit_tiny", "--model_name_or_path", "x"], RecipeArgumentError, "got both"),
        (["--model_preset", "vit_tiny", "--dataset_name", "fashion mnst"], UnknownDatasetError, r"fashion mnst.*Did you mean 'fashion_mnist'"),
        (["--model_name_or_path", "google/vit-base-patch16-224-in21k", "--patch_size", "4"], RecipeArgumentError, "apply only with --model_preset"),
        (["--model_preset", "vit_tiny", "--quant_bits", "W8"], RecipeArgumentError, "W8.*WxAy"),
        (["--model_preset", "vit_tiny", "--crop_scale", "0.8"], RecipeArgumentError, "crop_scale takes two numbers"),
    ],
)  # fmt: skip
def test_bad_input_is_refused_with_a_message_that_says_what_to_do(tmp_path, argv, error, needle):
    with pytest.raises(error, match=needle):
        parse_recipe_args([*argv, "--output_dir", str(tmp_path)])


@pytest.mark.parametrize(
    ("source", "needle"),
    [
        ("{tmp}/no_such_model", r"no such directory \(.*no_such_model\)"),
        ("./my-vit", r"'./my-vit': no such directory"),
        ("{tmp}", "a directory without a config.json"),
        ("bad id!", "is not a Hub id"),
    ],
)
def test_a_model_source_that_cannot_exist_is_named_at_parse_time(tmp_path, source, needle):
    with pytest.raises(RecipeArgumentError, match=needle):
        parse_recipe_args(
            ["--model_name_or_path", source.format(tmp=tmp_path), "--output_dir", str(tmp_path)]
        )


def test_a_hub_id_that_cannot_be_loaded_fails_before_any_data_loads(tmp_path, monkeypatch):
    import hf_cd.recipe.run

    def no_data(*args, **kwargs):
        raise AssertionError("the data was loaded before the model source was checked")

    monkeypatch.setattr(hf_cd.recipe.run, "load_recipe_data", no_data)
    args = parse_recipe_args(
        ["--model_name_or_path", "someone/no-such-model", *QUICK, "--output_dir", str(tmp_path)]
    )
    with pytest.raises(RecipeArgumentError, match=r"'someone/no-such-model': no local directory.*Hub id"):
        run_recipe(args)  # the tests run with HF_HUB_OFFLINE=1 (conftest)


def test_a_model_source_on_the_command_line_replaces_the_config_files(tmp_path):
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text("{}")
    cpu_config = str(CONFIGS / "fashion_mnist_vit_tiny_cpu.yaml")
    for clear in (
        [],
        ["--model_preset", "none"],
        ["--model_preset", "None"],
        ["--model_preset", "null"],
        ["--model_preset", ""],
    ):
        args = parse_recipe_args(
            [
                "--config",
                cpu_config,
                *clear,
                "--model_name_or_path",
                str(checkpoint),
                "--output_dir",
                str(tmp_path),
            ]
        )
        assert args.model.model_preset is None and args.model.model_name_or_path == str(checkpoint), clear
        # the preset's shape and normalization went with it; the image size applies to both and stays
        assert (
            args.model.patch_size is None
            and args.model.image_mean is None
            and args.model.num_hidden_layers is None
        )
        assert args.model.image_size == 28 and args.data.max_train_samples == 24000
    dashed = parse_recipe_args(
        ["--config", cpu_config, f"--model-name-or-path={checkpoint}", "--output_dir", str(tmp_path)]
    )
    assert dashed.model.model_preset is None and dashed.model.model_name_or_path == str(checkpoint)
    # a flag given on the command line stays (and is then refused, because it shapes a preset only)
    with pytest.raises(RecipeArgumentError, match="patch_size shape a model trained from scratch"):
        parse_recipe_args(["--config", cpu_config, "--model_name_or_path", str(checkpoint), "--patch_size", "4",
                           "--output_dir", str(tmp_path)])  # fmt: skip

    checkpoint_config = tmp_path / "checkpoint.yaml"
    checkpoint_config.write_text(f"model_name_or_path: {checkpoint}\noutput_dir: {tmp_path}\n")
    args = parse_recipe_args(["--config", str(checkpoint_config), "--model_preset", "vit_tiny"])
    assert args.model.model_preset == "vit_tiny" and args.model.model_name_or_path is None
    with pytest.raises(RecipeArgumentError, match="exactly one model source, got neither"):
        parse_recipe_args(["--config", cpu_config, "--model_preset", "none", "--output_dir", str(tmp_path)])


def _image_folder(
    root: Path, colours: dict[str, tuple[int, int, int]], per_class: int = 6, size: int = 8
) -> Path:
    """An imagefolder tree (one sub-folder per class) of flat-coloured PNGs with known pixel statistics."""
    from PIL import Image as PILImage

    for name, colour in colours.items():
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            PILImage.new("RGB", (size, size), colour).save(root / name / f"{i}.png")
    return root


def test_channel_statistics_of_an_image_folder_are_its_pixels_mean_and_std(tmp_path):
    from hf_cd.data import channel_statistics

    folder = _image_folder(tmp_path / "images", {"dark": (51, 102, 0), "light": (153, 102, 255)})
    train = load_image_dataset(folder, seed=0, validation_fraction=0.25)["train"]
    stats = channel_statistics(train, 3)
    labels = train["label"]
    share_light = sum(labels) / len(labels)  # label 1 = "light"
    expected_mean = [51 / 255 + share_light * 102 / 255, 102 / 255, share_light]
    expected_std = [
        (102 / 255) * (share_light * (1 - share_light)) ** 0.5,
        1.0,  # a constant channel is left unscaled
        (share_light * (1 - share_light)) ** 0.5,
    ]
    assert stats.num_images == len(train)
    assert stats.mean == pytest.approx(expected_mean, abs=1e-3) and stats.std == pytest.approx(
        expected_std, abs=1e-3
    )
    gray = channel_statistics(train, 1)  # converted as a 1-channel model sees the images
    assert len(gray.mean) == 1 and 0 < gray.mean[0] < 1


def test_imagefolder_config_normalizes_with_the_training_split_and_does_not_flip(tmp_path):
    from hf_cd.recipe import build_model, load_recipe_data
    from hf_cd.recipe.model import describe_normalization, preset_normalization

    folder = _image_folder(tmp_path / "images", {"a": (10, 20, 30), "b": (200, 180, 160), "c": (90, 90, 90)})
    args = parse_recipe_args(
        ["--config", str(CONFIGS / "imagefolder_vit_tiny_cpu.yaml"), "--dataset_name", str(folder),
         "--output_dir", str(tmp_path / "out")]
    )  # fmt: skip
    assert args.data.flip_probability == 0.0 and args.model.image_mean is None
    raw = load_recipe_data(args.data, seed=0)
    from hf_cd.data import channel_statistics, label_mapping

    normalization = preset_normalization(args.model, raw["train"], seed=0)
    expected = channel_statistics(raw["train"], 3)
    _, processor = build_model(args.model, label_mapping(raw), normalization)
    assert list(processor.image_mean) == pytest.approx(list(expected.mean))
    assert list(processor.image_std) == pytest.approx(list(expected.std))
    assert processor.image_mean != [0.5, 0.5, 0.5]
    record = describe_normalization(processor, args.model, normalization)
    assert record["source"] == f"computed from {len(raw['train'])} training images"

    # given values win; a checkpoint keeps its own processor's
    given = parse_recipe_args(
        ["--config", str(CONFIGS / "fashion_mnist_vit_tiny_cpu.yaml"), "--output_dir", str(tmp_path / "out")]
    )
    assert preset_normalization(given.model, raw["train"], seed=0) is None
    assert given.data.flip_probability == 0.5  # Fashion-MNIST's config asks for flips explicitly


def test_a_run_with_few_optimizer_steps_is_warned_about(tmp_path):
    from hf_cd.recipe.run import few_steps_warning, planned_optimizer_steps

    def training(*flags):
        return parse_recipe_args(["--model_preset", "vit_tiny", "--output_dir", str(tmp_path), "--use_cpu", "true",
                                  *flags]).training  # fmt: skip

    one_epoch = training("--num_train_epochs", "1", "--per_device_train_batch_size", "128")
    assert planned_optimizer_steps(1400, one_epoch) == 11  # the digits folder of the report
    message = few_steps_warning(1400, one_epoch)
    assert "Only 11 optimizer steps (1 epoch(s) of 1,400 images at 128 per step)" in message
    assert "--num_train_epochs" in message
    assert few_steps_warning(1400 * 30, one_epoch) is None  # 329 steps
    assert planned_optimizer_steps(24000, one_epoch) == 188  # make run
    assert "--max_steps 6" in few_steps_warning(24000, training("--max_steps", "6"))
    accumulated = training("--num_train_epochs", "2", "--per_device_train_batch_size", "10",
                           "--gradient_accumulation_steps", "4")  # fmt: skip
    assert planned_optimizer_steps(1000, accumulated) == 50


def test_presets_have_the_standard_shapes():
    shapes = {
        name: (p.hidden_size, p.num_hidden_layers, p.num_attention_heads) for name, p in MODEL_PRESETS.items()
    }
    assert shapes == {"vit_tiny": (192, 12, 3), "vit_small": (384, 12, 6), "vit_base": (768, 12, 12)}


def test_unknown_quantization_pipeline_fails_before_training(tmp_path):
    finetune = load_finetune()
    with pytest.raises(RecipeArgumentError, match="no_such_pipeline"):
        finetune.main(
            [*TINY_PRESET, *QUICK, "--output_dir", str(tmp_path), "--max_steps", "1", "--max_train_samples", "20",
             "--quant_pipelines", "no_such_pipeline", "--debug"]
        )  # fmt: skip
    assert not (tmp_path / "model.safetensors").exists()


def test_a_misspelt_flag_gets_a_did_you_mean():
    with pytest.raises(
        RecipeArgumentError, match=r"Unknown option\(s\) --cd_strenght \(did you mean --cd_strength\?\)"
    ):
        parse_recipe_args(["--model_preset", "vit_tiny", "--cd_strenght", "2"])
    with pytest.raises(RecipeArgumentError, match=r"--learnig_rate \(did you mean --learning_rate\?\)"):
        parse_recipe_args(["--model_preset", "vit_tiny", "--learnig_rate=1e-3"])
    with pytest.raises(RecipeArgumentError, match="Unexpected argument"):
        parse_recipe_args(["--model_preset", "vit_tiny", "stray"])


def test_bare_debug_is_the_recipes_and_debug_with_values_the_trainers(tmp_path):
    from hf_cd.errors import split_debug_flag

    assert split_debug_flag(["--debug", "--model_preset", "vit_tiny"]) == (
        True,
        ["--model_preset", "vit_tiny"],
    )
    assert split_debug_flag(["--model_preset", "vit_tiny", "--debug"]) == (
        True,
        ["--model_preset", "vit_tiny"],
    )
    args = parse_recipe_args(
        ["--model_preset", "vit_tiny", "--debug", "underflow_overflow", "--output_dir", str(tmp_path)]
    )
    assert [str(option.value) for option in args.training.debug] == ["underflow_overflow"]


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--cd_strenght", "2"], "did you mean --cd_strength?"),
        (["--quant_bits", "W9A9"], "quant_bits: 'W9A9': w_bits=9 is out of range"),
        (["--resume_from_checkpoint", "latest"], "holds no checkpoint"),
        (["--config", "no_such.yaml"], "--config 'no_such.yaml': no such file"),
        (["--quant_pipelines", "rotate_gptaq", "--quant_bits", "W4A4", "--quant_extra",
          '{"rotate_activaton": "dynamic_per_token"}'],
         "--quant_extra (pipeline rotate_gptaq at W4A4): Unknown rotate_gptaq option 'rotate_activaton'. "
         "Did you mean 'rotate_activations'?"),
        (["--quant_extra", "{rotate_activations: dynamic_per_token}"], "--quant_extra is not valid JSON"),
        (["--quant_extra", '["rotate_activations"]'], "--quant_extra must be a JSON object"),
    ],
)  # fmt: skip
def test_bad_input_on_the_command_line_is_one_line_and_exit_status_2(
    tmp_path, capsys, monkeypatch, argv, needle
):
    monkeypatch.delenv("HF_CD_DEBUG", raising=False)
    finetune = load_finetune()
    command = [*TINY_PRESET, *QUICK, "--output_dir", str(tmp_path), "--quant_pipelines", "minmax", *argv]
    with pytest.raises(SystemExit) as exit_info:
        finetune.main(command)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and needle in err and "\n" not in err and "Traceback" not in err, err
    assert "--debug or HF_CD_DEBUG=1 shows the traceback" in err
    # --debug, or HF_CD_DEBUG=1, lets the exception through (with its traceback)
    with pytest.raises(RecipeArgumentError):
        finetune.main([*command, "--debug"])
    monkeypatch.setenv("HF_CD_DEBUG", "1")
    with pytest.raises(RecipeArgumentError):
        finetune.main(command)


def test_quant_extra_from_yaml_or_command_line_reaches_the_quant_config_and_the_record(tmp_path, monkeypatch):
    from hf_cd import quant
    from hf_cd.recipe.evaluation import check_quant_arguments, run_quantized_evaluation

    extra = {"rotate_activations": "dynamic_per_token", "rotate_seed": 3}
    config_file = tmp_path / "recipe.yaml"
    config_file.write_text(
        yaml.safe_dump(
            {"model_preset": "vit_tiny", "output_dir": str(tmp_path), "quant_pipelines": ["rotate_gptaq"],
             "quant_bits": ["W4A4"], "quant_extra": extra}
        )
    )  # fmt: skip
    from_yaml = parse_recipe_args(["--config", str(config_file)]).quant
    from_cli = parse_recipe_args(
        ["--model_preset", "vit_tiny", "--output_dir", str(tmp_path), "--quant_pipelines", "rotate_gptaq",
         "--quant_bits", "W4A4", "--quant_extra", json.dumps(extra)]
    ).quant  # fmt: skip
    assert from_yaml.quant_extra == from_cli.quant_extra == extra
    flag_wins = parse_recipe_args(["--config", str(config_file), "--quant_extra", '{"rotate_solver": "rtn"}'])
    assert flag_wins.quant.quant_extra == {"rotate_solver": "rtn"}  # replaces the file's mapping, as any flag
    assert (
        parse_recipe_args(["--model_preset", "vit_tiny", "--output_dir", str(tmp_path)]).quant.quant_extra
        == {}
    )

    class FakeTable:
        num_reused = 0

        def to_dicts(self):
            return []

    seen = []

    def fake_evaluate_quantized(
        model, eval_data, calibration_data, *, pipelines, bits, config, extra, **kwargs
    ):
        seen.append((pipelines, bits, extra))
        return FakeTable()

    monkeypatch.setattr(quant, "evaluate_quantized", fake_evaluate_quantized)
    for quant_args in (from_yaml, from_cli):
        check_quant_arguments(quant_args, seed=0)  # known keys pass the parse-time check
        record = run_quantized_evaluation(
            torch.nn.Identity(), [0] * 4, [0] * 8, quant_args, seed=0, progress=False
        )
        assert record["pipelines"] == ["rotate_gptaq"] and record["bits"] == ["W4A4"]
        assert record["extra"] == extra and record["status"] == "done"
    assert [(p, b, e) for p, b, e in seen] == [(["rotate_gptaq"], [(4, 4)], extra)] * 2


def test_a_misspelt_runtime_setting_in_quant_extra_is_refused_before_training(tmp_path, capsys, monkeypatch):
    pytest.importorskip("onnxruntime")
    monkeypatch.delenv("HF_CD_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        load_finetune().main(
            [*TINY_PRESET, *QUICK, "--output_dir", str(tmp_path), "--quant_pipelines", "onnxruntime-int8",
             "--quant_bits", "W8A8", "--quant_extra", '{"onnxruntime": {"calibration_metod": "percentile"}}']
        )  # fmt: skip
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --quant_extra (pipeline onnxruntime-int8 at W8A8): ") and "\n" not in err, (
        err
    )
    assert "'calibration_metod'" in err and "Did you mean 'calibration_method'?" in err, err
    assert not (tmp_path / "model.safetensors").exists() and not (tmp_path / "results.json").exists()


# --- end to end -----------------------------------------------------------------------------------


@torch.no_grad()
def _accuracy_and_logits(model, dataset) -> tuple[float, torch.Tensor]:
    batch = collate_fn([dataset[i] for i in range(len(dataset))])
    logits = model.eval()(pixel_values=batch["pixel_values"]).logits
    return (logits.argmax(-1) == batch["labels"]).float().mean().item(), logits  # in [0, 1], as results.json


@pytest.mark.slow
@requires_fashion_mnist
def test_recipe_trains_evaluates_quantizes_and_saves_a_model_that_reloads(tmp_path):
    out = tmp_path / "run"
    run = load_finetune().main(
        [*TINY_PRESET, *QUICK, "--output_dir", str(out), "--max_steps", "6", "--per_device_train_batch_size", "16",
         "--max_train_samples", "200", "--max_eval_samples", "60", "--max_test_samples", "100",
         "--eval_strategy", "steps", "--eval_steps", "3", "--logging_steps", "3", "--save_steps", "3",
         "--diagnostics_samples", "16", "--quant_pipelines", "minmax", "repq", "--quant_bits", "W8A8", "W4A4",
         "--quant_num_calibration", "8", "--quant_max_eval_samples", "40"]
    )  # fmt: skip
    results = json.loads((out / "results.json").read_text())
    assert results == json.loads(json.dumps(run.results))

    normalization = results["dataset"].pop("normalization")
    assert normalization["source"] == "computed from 200 training images"  # a preset without --image_mean
    assert abs(normalization["mean"][0] - 0.286) < 0.03 and abs(normalization["std"][0] - 0.353) < 0.03
    assert any("Only 6 optimizer steps (--max_steps 6)" in w for w in results["warnings"])
    assert results["dataset"] == {
        "name": "fashion_mnist",
        "label": None,
        "num_labels": 10,
        "train_samples": 200,
        "validation_samples": 60,
        "test_samples": 100,
    }  # corrupt_images_skipped appears only with --skip_corrupt_images
    assert results["model"]["source"] == "preset vit_tiny" and results["model"]["hidden_size"] == 32
    assert results["training"]["global_step"] == 6 and results["training"]["resumed_from"] is None
    assert results["cd_settings"]["strength"] == 5.0 and results["cd_settings"]["kinds"] == [
        "ffn",
        "value_output",
    ]
    assert 0.0 <= results["test"]["accuracy"] <= 1.0 and results["test"]["loss"] > 0
    assert results["accuracy_unit"] == "fraction"
    assert results["validation"]["accuracy"] is not None
    for moment in ("before", "after"):
        summary = results["diagnostics"][moment]
        assert set(summary["alignment"]) == {"ffn", "value_output"}
        assert all(0 < v["mean"] <= v["max"] <= 1 for v in summary["alignment"].values())
        assert summary["outliers"]["residual_max"] >= summary["outliers"]["residual_max_last_block"] > 0
    assert results["diagnostics"]["before"] != results["diagnostics"]["after"]  # the weights did move
    for key in ("train", "test_eval", "quant_eval", "total"):
        assert results["wall_time_s"][key] >= 0
    assert results["wall_time_s"]["total"] >= results["wall_time_s"]["train"]
    assert results["model_card"] == str(out / "README.md")  # hf_cd.hub's card; tests/test_hub.py checks it
    for plot in results["plots"].values():
        assert Path(plot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the saved model (safetensors + image processor) reloads and gives the same logits
    assert (out / "model.safetensors").is_file() and (out / "preprocessor_config.json").is_file()
    reloaded = AutoModelForImageClassification.from_pretrained(out)
    processor = AutoImageProcessor.from_pretrained(out)
    assert reloaded.config.id2label[7] == FASHION_MNIST_CLASSES[7]
    assert reloaded.config.hf_cd["strength"] == 5.0
    raw = load_image_dataset("fashion_mnist", seed=0)
    test = subsample_stratified(raw["test"], 100, 0)
    test = with_image_transforms({"test": test}, processor, 1, train_split="none")["test"]
    accuracy, logits = _accuracy_and_logits(reloaded, test)
    _, trained_logits = _accuracy_and_logits(run.trainer.model.cpu(), test)
    torch.testing.assert_close(logits, trained_logits, rtol=0, atol=0)
    assert accuracy == pytest.approx(results["test"]["accuracy"], abs=1e-6)
    after = alignment_summary(measure_alignment(reloaded))
    assert after["ffn"]["mean"] == pytest.approx(results["diagnostics"]["after"]["alignment"]["ffn"]["mean"])

    quantized = results["quantized"]
    assert quantized["status"] == "done"
    rows = quantized["rows"]
    assert [(r["pipeline"], r["w_bits"], r["a_bits"]) for r in rows[1:]] == [
        ("minmax", 8, 8),
        ("minmax", 4, 4),
        ("repq", 8, 8),
        ("repq", 4, 4),
    ]
    assert rows[0]["pipeline"] == "full_precision" and all(r["num_eval"] == 40 for r in rows)
    assert all(0 <= r["accuracy"] <= 1 for r in rows)
    assert all(r["num_calibration"] == 8 for r in rows[1:])

    summary = format_summary(results)
    for needle in ("fashion_mnist", "6 steps", "test ", str(out / "results.json"), "ffn alignment", "→"):
        assert needle in summary, needle
    assert "| minmax |" in summary and "W4A4" in summary


def _save_pretrained_tiny(directory: Path, model_class, config) -> Path:
    """A stand-in for a Hub checkpoint: 3 labels, RGB, its own image processor."""
    torch.manual_seed(1)
    model = model_class(config)
    model.save_pretrained(directory)
    from transformers import ViTImageProcessorPil

    ViTImageProcessorPil(size={"height": 28, "width": 28}).save_pretrained(directory)
    return directory


@pytest.mark.slow
@requires_fashion_mnist
@pytest.mark.parametrize(
    ("model_class", "config"),
    [
        (ViTForImageClassification, tiny_vit_config(num_labels=3, num_channels=3)),
        (Dinov2ForImageClassification, tiny_dinov2_config(num_labels=3, num_channels=3)),
    ],
    ids=["vit", "dinov2"],
)
def test_fine_tuning_a_checkpoint_replaces_its_head_with_the_datasets_labels(tmp_path, model_class, config):
    source = _save_pretrained_tiny(tmp_path / "pretrained", model_class, config)
    run = load_finetune().main(
        ["--model_name_or_path", str(source), *QUICK, "--output_dir", str(tmp_path / "out"), "--max_steps", "2",
         "--per_device_train_batch_size", "8", "--max_train_samples", "40", "--max_eval_samples", "20",
         "--max_test_samples", "20", "--no_quant_eval", "--diagnostics_samples", "4"]
    )  # fmt: skip
    model = run.trainer.model
    assert model.config.num_labels == 10 and model.classifier.out_features == 10
    assert model.config.label2id["Ankle boot"] == 9
    assert run.results["model"]["source"] == str(source)
    assert run.results["quantized"]["status"] == "skipped"
    # the encoder starts from the checkpoint, not from a fresh init: 2 AdamW steps at lr 3e-3 move it ≤ ~0.01
    pretrained = dict(model_class.from_pretrained(source).named_parameters())
    trained = dict(model.named_parameters())
    encoder = [name for name in pretrained if "classifier" not in name]
    assert encoder and all(pretrained[n].shape == trained[n].shape for n in encoder)
    assert max((trained[n].detach() - pretrained[n].detach()).abs().max().item() for n in encoder) < 0.015


@requires_fashion_mnist
def test_augmentation_is_a_function_of_seed_epoch_and_row_and_leaves_the_global_rng_alone():
    from transformers import ViTImageProcessorPil

    train = load_image_dataset("fashion_mnist", seed=0, max_train_samples=40)["train"]
    preprocessing = ImagePreprocessing.from_image_processor(
        ViTImageProcessorPil(size={"height": 28, "width": 28}), 1
    )

    def augmented(seed: int, epoch: int) -> list[torch.Tensor]:
        dataset = SeededAugmentation(train, preprocessing, (0.5, 1.0), (3 / 4, 4 / 3), 0.5, seed)
        dataset.set_epoch(epoch)
        return [dataset[i]["pixel_values"] for i in range(10)]

    rng = torch.get_rng_state()
    reference = augmented(0, 0)
    assert torch.equal(rng, torch.get_rng_state())
    assert all(torch.equal(a, b) for a, b in zip(reference, augmented(0, 0)))
    assert (
        sum(not torch.equal(a, b) for a, b in zip(reference, augmented(0, 1))) >= 8
    )  # a new epoch, new crops
    assert sum(not torch.equal(a, b) for a, b in zip(reference, augmented(1, 0))) >= 8


# --- resume ---------------------------------------------------------------------------------------


@pytest.mark.slow
@requires_fashion_mnist
def test_resume_from_checkpoint_continues_exactly(tmp_path):
    """Mid-epoch checkpoint, dropout, random crops and flips, CD: the resumed run ends bit for bit equal."""
    common = [
        *TINY_PRESET, *QUICK, "--max_steps", "6", "--save_steps", "3", "--per_device_train_batch_size", "16",
        "--max_train_samples", "64", "--max_eval_samples", "16", "--max_test_samples", "16",
        "--hidden_dropout_prob", "0.1", "--no_quant_eval", "--diagnostics_samples", "4",
    ]  # fmt: skip
    finetune = load_finetune()
    straight = tmp_path / "straight"
    finetune.main([*common, "--output_dir", str(straight)])

    # an "interrupted" run: its output_dir holds only the step-3 checkpoint, and it resumes from the latest one
    interrupted = tmp_path / "interrupted"
    shutil.copytree(straight / "checkpoint-3", interrupted / "checkpoint-3")
    run = finetune.main([*common, "--output_dir", str(interrupted), "--resume_from_checkpoint", "latest"])
    assert run.results["training"]["resumed_from"] == str(interrupted / "checkpoint-3")
    assert run.results["training"]["global_step"] == 6
    assert run.trainer.cd_callback.num_updates == 6
    assert run.trainer.train_dataset.epoch == 1  # the 4-step epochs: step 6 ran in the second one

    expected, resumed = (
        load_file(straight / "model.safetensors"),
        load_file(interrupted / "model.safetensors"),
    )
    assert expected.keys() == resumed.keys()
    for name in expected:
        assert torch.equal(expected[name], resumed[name]), name
    started_over = json.loads((straight / "results.json").read_text())
    assert run.results["test"]["accuracy"] == started_over["test"]["accuracy"]


def test_resume_latest_without_a_checkpoint_says_so(tmp_path):
    finetune = load_finetune()
    with pytest.raises(RecipeArgumentError, match="holds no checkpoint"):
        finetune.main(
            [
                *TINY_PRESET,
                *QUICK,
                "--output_dir",
                str(tmp_path),
                "--resume_from_checkpoint",
                "latest",
                "--debug",
            ]
        )


@requires_fashion_mnist
def test_lora_fine_tuning_saves_the_adapter_and_a_merged_model_and_never_writes_w0(tmp_path):
    source = _save_pretrained_tiny(
        tmp_path / "pretrained",
        Dinov2ForImageClassification,
        tiny_dinov2_config(num_labels=3, num_channels=3),
    )
    out = tmp_path / "out"
    run = load_finetune().main(
        ["--model_name_or_path", str(source), *QUICK, "--output_dir", str(out), "--max_steps", "3",
         "--per_device_train_batch_size", "8", "--max_train_samples", "40", "--max_eval_samples", "20",
         "--max_test_samples", "20", "--diagnostics_samples", "4", "--use_lora", "true", "--lora_r", "4",
         "--learning_rate", "1e-2", "--quant_pipelines", "minmax", "--quant_bits", "W8A8",
         "--quant_num_calibration", "8", "--quant_max_eval_samples", "20"]
    )  # fmt: skip
    results = run.results
    assert results["model"]["lora"]["r"] == 4
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    merged = Dinov2ForImageClassification.from_pretrained(out)
    assert not any("lora" in name for name, _ in merged.named_parameters())
    # W0 was never written: merged weight − s·B·A (from the saved adapter) is the checkpoint's weight
    pretrained = dict(Dinov2ForImageClassification.from_pretrained(source).named_parameters())
    adapter = load_file(out / "adapter" / "adapter_model.safetensors")
    scaling = 16.0 / 4  # lora_alpha / r
    checked = 0
    for name, merged_weight in merged.named_parameters():
        a_key = f"base_model.model.{name.removesuffix('.weight')}.lora_A.weight"
        if a_key not in adapter:
            continue
        b = adapter[a_key.replace("lora_A", "lora_B")]
        assert b.abs().max() > 0, f"{name}: the adapter did not train"
        w0 = merged_weight.detach() - scaling * b @ adapter[a_key]
        torch.testing.assert_close(w0, pretrained[name].detach(), rtol=0, atol=1e-6, msg=name)
        checked += 1
    assert checked == 2 * 6  # 2 blocks × q, k, v, o, fc1, fc2
    assert results["quantized"]["status"] == "done"
    assert results["cd_settings"]["strength"] == 5.0


@pytest.mark.slow
@requires_fashion_mnist
def test_fine_tuning_a_checkpoint_at_another_resolution_resamples_its_position_embeddings(tmp_path):
    source = _save_pretrained_tiny(
        tmp_path / "pretrained",
        Dinov2ForImageClassification,
        tiny_dinov2_config(num_labels=3, num_channels=3),
    )
    out = tmp_path / "out"
    run = load_finetune().main(
        ["--model_name_or_path", str(source), "--image_size", "14", *QUICK, "--output_dir", str(out),
         "--max_steps", "1", "--per_device_train_batch_size", "8", "--max_train_samples", "16",
         "--max_eval_samples", "8", "--max_test_samples", "8", "--no_quant_eval", "--diagnostics_samples", "4"]
    )  # fmt: skip
    assert run.results["model"]["image_size"] == 14
    reloaded = Dinov2ForImageClassification.from_pretrained(out)
    assert reloaded.config.image_size == 14
    assert reloaded.dinov2.embeddings.position_embeddings.shape[1] == 1 + 2 * 2  # CLS + 2×2 patches of 7 px
    preprocessing = ImagePreprocessing.from_image_processor(AutoImageProcessor.from_pretrained(out), 3)
    assert preprocessing.output_size == (14, 14) and not preprocessing.center_crop


def test_image_size_that_is_not_a_multiple_of_the_patch_size_is_refused(tmp_path):
    from hf_cd.recipe import build_model

    source = _save_pretrained_tiny(
        tmp_path / "pretrained",
        Dinov2ForImageClassification,
        tiny_dinov2_config(num_labels=3, num_channels=3),
    )
    args = parse_recipe_args(
        ["--model_name_or_path", str(source), "--image_size", "20", "--output_dir", str(tmp_path)]
    )
    with pytest.raises(RecipeArgumentError, match=r"--image_size 20.*multiple of the patch size 7"):
        build_model(args.model, {"num_labels": 10})


@pytest.mark.slow
@requires_fashion_mnist
@pytest.mark.skipif(importlib.util.find_spec("onnx") is None, reason="onnx is not installed")
def test_the_offline_pretrained_checkpoint_fine_tunes_through_the_recipe(tmp_path):
    from hf_cd.pretrained import PretrainedSourceError, offline_dinov2_small

    try:
        checkpoint = offline_dinov2_small(tmp_path / "dinov2-small")
    except PretrainedSourceError as error:
        pytest.skip(str(error))
    run = load_finetune().main(
        ["--config", str(CONFIGS / "fashion_mnist_dinov2_small_cpu.yaml"), "--model_name_or_path", str(checkpoint),
         "--output_dir", str(tmp_path / "out"), "--max_steps", "1", "--per_device_train_batch_size", "4",
         "--max_train_samples", "8", "--max_eval_samples", "8", "--max_test_samples", "8", "--no_quant_eval",
         "--diagnostics_samples", "4", "--disable_tqdm", "true", "--save_strategy", "no"]
    )  # fmt: skip
    model = run.trainer.model
    assert type(model).__name__ == "Dinov2ForImageClassification" and model.classifier.out_features == 10
    assert model.config.image_size == 56 and model.config.hidden_size == 384
