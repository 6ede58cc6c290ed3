"""The fine-tuning recipe behind ``recipes/finetune.py`` and ``make run``, as reusable parts.

Why a package and not just a script: the argument dataclasses, model presets, results writer and
summary printer are what tests, benchmarks and other scripts reuse; the script only parses and
calls `run_recipe`. One run does: load data → build (or download) the model → measure alignment and
outliers → train with `CDTrainer` → evaluate on test → quantized evaluation (when `hf_cd.quant` is
installed) → measure again → save model, image processor, ``results.json`` and plots.

Where each part lives:

- `hf_cd.recipe.arguments`: the option dataclasses (model, data, quantization; CD and Trainer options
  are `hf_cd.CDConfig`) and the model presets;
- `hf_cd.recipe.parser`: the command-line parser, its ``--help`` and the YAML ``--config`` layering;
- `hf_cd.recipe.model`: building the model and image processor (preset or checkpoint), LoRA;
- `hf_cd.recipe.data`: the raw splits and the seeded, resumable train augmentation;
- `hf_cd.recipe.evaluation`: accuracy, before/after diagnostics, the quantized evaluation;
- `hf_cd.recipe.run`: `run_recipe`, one run end to end, and checkpoint resolution;
- `hf_cd.recipe.report`: ``results.json``, the model card and the end-of-run summary;
- `hf_cd.recipe.cli`: the command line (``recipes/finetune.py``): one-line errors, ``--debug``.
"""

from hf_cd.recipe.arguments import (
    DEFAULT_QUANT_BITS,
    DEFAULT_QUANT_PIPELINES,
    LORA_ADAPTER_DIR,
    LORA_TARGETS,
    MODEL_PRESETS,
    PRESET_ONLY_OPTIONS,
    DataArguments,
    ModelArguments,
    ModelPreset,
    QuantArguments,
    RecipeArgumentError,
    RecipeArguments,
    check_model_source,
)
from hf_cd.recipe.data import (
    SeededAugmentation,
    check_resumable_augmentation,
    eval_transformed,
    first_batch,
    load_recipe_data,
)
from hf_cd.recipe.evaluation import (
    QAT_MODEL_DIR,
    Diagnostics,
    accuracy_metric,
    check_qat_arguments,
    check_quant_arguments,
    measure_diagnostics,
    predictions_from_logits,
    run_qat_evaluation,
    run_quantized_evaluation,
)
from hf_cd.recipe.model import (
    add_lora,
    build_model,
    checkpoint_config,
    describe_model,
)
from hf_cd.recipe.parser import load_config_file, parse_recipe_args, recipe_argument_parser
from hf_cd.recipe.report import (
    ACTIVATION_PLOT,
    ALIGNMENT_PLOT,
    RESULTS_FILE,
    format_summary,
    moment_labels,
    plot_title,
    quantized_accuracy_table,
    rounded,
    write_json_atomic,
    write_model_card,
)
from hf_cd.recipe.run import (
    RESUME_LATEST,
    RecipeRun,
    resolve_checkpoint,
    run_recipe,
)

__all__ = [
    "ACTIVATION_PLOT",
    "ALIGNMENT_PLOT",
    "DEFAULT_QUANT_BITS",
    "DEFAULT_QUANT_PIPELINES",
    "LORA_ADAPTER_DIR",
    "LORA_TARGETS",
    "MODEL_PRESETS",
    "PRESET_ONLY_OPTIONS",
    "QAT_MODEL_DIR",
    "RESULTS_FILE",
    "RESUME_LATEST",
    "DataArguments",
    "Diagnostics",
    "ModelArguments",
    "ModelPreset",
    "QuantArguments",
    "RecipeArgumentError",
    "RecipeArguments",
    "RecipeRun",
    "SeededAugmentation",
    "accuracy_metric",
    "add_lora",
    "build_model",
    "check_model_source",
    "check_qat_arguments",
    "check_quant_arguments",
    "check_resumable_augmentation",
    "checkpoint_config",
    "describe_model",
    "eval_transformed",
    "first_batch",
    "format_summary",
    "load_config_file",
    "load_recipe_data",
    "measure_diagnostics",
    "moment_labels",
    "parse_recipe_args",
    "plot_title",
    "predictions_from_logits",
    "quantized_accuracy_table",
    "recipe_argument_parser",
    "resolve_checkpoint",
    "rounded",
    "run_qat_evaluation",
    "run_quantized_evaluation",
    "run_recipe",
    "write_json_atomic",
    "write_model_card",
]
