"""Load a CD-trained checkpoint (safetensors only) and push one to the Hub with its card."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import yaml
from huggingface_hub import ModelCard, create_repo, upload_folder
from huggingface_hub import snapshot_download as _snapshot_download
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id
from transformers.utils import (
    CONFIG_NAME,
    IMAGE_PROCESSOR_NAME,
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
)

from hf_cd.files import atomic_write_text
from hf_cd.hub.card import (
    CARD_FILE,
    build_model_card,
    check_card_replaceable,
    is_hf_cd_card,
    user_card_metadata,
)
from hf_cd.hub.card_facts import RESULTS_FILE, fresh_results
from hf_cd.hub.card_metadata import CARD_COLUMNS
from hf_cd.hub.errors import (
    LOAD_HINT,
    IncompleteResultsWarning,
    ModelCardError,
    UnsafeWeightsError,
    checked_repo_id,
    hub_errors,
)
from hf_cd.hub.parse import parse_card
from hf_cd.quant.results import QuantResults

if TYPE_CHECKING:
    from transformers import BaseImageProcessor, PreTrainedModel

logger = logging.getLogger(__name__)

_PICKLE_WEIGHTS = "pytorch_model*.bin"  # transformers' pickle weights (not training_args.bin, also a pickle)
_SAFE_DOWNLOAD_PATTERNS = ["*.safetensors", "*.json", CARD_FILE]
_PICKLE_DOWNLOAD_PATTERNS = [_PICKLE_WEIGHTS]


def _pickle_files(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.glob(_PICKLE_WEIGHTS) if path.is_file())


def load_cd_checkpoint(
    source: str | os.PathLike,
    *,
    revision: str | None = None,
    token: str | None = None,
    allow_pickle: bool = False,
) -> tuple[PreTrainedModel, BaseImageProcessor | None, QuantResults]:
    """``(model, image_processor, results)`` of a CD-trained checkpoint (Hub repo id or local folder).

    ``results`` is `read_quantized_results` of its card. A folder without a card gives empty results
    and an `IncompleteResultsWarning`, and a malformed card raises `ModelCardError`. Only
    safetensors weights load. ``allow_pickle=True`` accepts ``pytorch_model.bin``, but only for a
    source you trust, because unpickling can execute arbitrary code. Remote code is never run. The
    image processor is None when the folder has none.
    """
    from transformers import AutoModelForImageClassification

    from hf_cd.data.transforms import load_image_processor

    path = Path(source).expanduser()
    if path.is_dir():
        folder = path
    else:
        repo_id = checked_repo_id(source)
        patterns = _SAFE_DOWNLOAD_PATTERNS + (_PICKLE_DOWNLOAD_PATTERNS if allow_pickle else [])
        with hub_errors(f"download {repo_id!r} (not a local directory)", token, offline_hint=LOAD_HINT):
            folder = Path(
                _snapshot_download(repo_id, revision=revision, token=token, allow_patterns=patterns)
            )
    has_safetensors = (folder / SAFE_WEIGHTS_NAME).is_file() or (folder / SAFE_WEIGHTS_INDEX_NAME).is_file()
    if not has_safetensors:
        pickles = _pickle_files(folder)
        if not allow_pickle:
            found = f"only pickle weights ({', '.join(pickles)})" if pickles else "no safetensors weights"
            raise UnsafeWeightsError(
                f"{os.fspath(source)} has {found}. Loading pickle weights can execute arbitrary code, so they are "
                "refused: ask for a safetensors copy, or pass allow_pickle=True only if you trust this source."
            )
        if not ((folder / WEIGHTS_NAME).is_file() or (folder / WEIGHTS_INDEX_NAME).is_file()):
            raise FileNotFoundError(f"{os.fspath(source)} holds no model weights ({SAFE_WEIGHTS_NAME}).")
        logger.warning("Loading pickle weights from %s because allow_pickle=True.", os.fspath(source))
    model = AutoModelForImageClassification.from_pretrained(
        folder, use_safetensors=has_safetensors, trust_remote_code=False
    )
    if getattr(model.config, "hf_cd", None) is None:
        logger.warning(
            "%s records no hf_cd settings in config.json: it was not trained with CD (a baseline, or not "
            "trained with CDTrainer).",
            source,
        )
    processor = None
    if (folder / IMAGE_PROCESSOR_NAME).is_file():
        processor = load_image_processor(folder)
    else:
        logger.warning("%s has no %s; preprocess images yourself.", source, IMAGE_PROCESSOR_NAME)
    if (folder / CARD_FILE).is_file():
        results = parse_card(
            (folder / CARD_FILE).read_text(encoding="utf-8-sig"), f"{os.fspath(source)}/{CARD_FILE}"
        )
    else:
        warnings.warn(
            f"{os.fspath(source)} has no {CARD_FILE} model card, so no quantized accuracy is known.",
            IncompleteResultsWarning,
            stacklevel=2,
        )
        results = QuantResults([], columns=list(CARD_COLUMNS))
    return model, processor, results


# --- pushing ---------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class HubUpload:
    """What `push_cd_model` uploads, or would upload with ``dry_run=True``."""

    repo_id: str
    folder: Path
    files: tuple[str, ...]
    """Paths relative to ``folder``: weights, config, image processor config, README.md, results.json."""
    card: str
    """The README.md text that is (or would be) uploaded."""
    private: bool = False
    commit_url: str | None = None
    """Set once the upload happened."""

    def describe(self) -> str:
        lines = [
            f"Would create {self.repo_id!r} ({'private' if self.private else 'public'}) if it does not exist "
            f"and upload {len(self.files)} files from {self.folder}:"
        ]
        for name in self.files:
            size = len(self.card.encode()) if name == CARD_FILE else (self.folder / name).stat().st_size
            note = " (generated card)" if name == CARD_FILE else ""
            lines.append(f"  {name:<40} {size / 1e6:8.3f} MB{note}")
        lines += [f"--- {CARD_FILE} ---", self.card]
        return "\n".join(lines)


def _shareable_files(folder: Path, with_results: bool) -> tuple[str, ...]:
    """The files of ``folder`` that make a shareable checkpoint.

    These are the safetensors weights (with the index and shards when sharded), ``config.json``,
    the image processor config, ``README.md`` and, when it describes these weights,
    ``results.json``. Checkpoints, optimizer states, ``training_args.bin``, plots and the LoRA
    ``adapter/`` are left out. The merged model beside them is what deploys.
    """
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a directory; give the output_dir of a trained model.")
    if (folder / SAFE_WEIGHTS_NAME).is_file():
        files = [SAFE_WEIGHTS_NAME]
    elif (folder / SAFE_WEIGHTS_INDEX_NAME).is_file():
        index = json.loads((folder / SAFE_WEIGHTS_INDEX_NAME).read_text(encoding="utf-8"))
        shards = sorted(set((index.get("weight_map") or {}).values()))
        missing = [shard for shard in shards if not (folder / shard).is_file()]
        if not shards or missing:
            raise FileNotFoundError(
                f"{folder / SAFE_WEIGHTS_INDEX_NAME} names shards that are not there ({', '.join(missing) or 'none'}); "
                "save the model again."
            )
        files = [SAFE_WEIGHTS_INDEX_NAME, *shards]
    else:
        pickles = _pickle_files(folder)
        if pickles:
            raise UnsafeWeightsError(
                f"{folder} holds only pickle weights ({', '.join(pickles)}), which execute arbitrary code when "
                "loaded; hf-cd uploads safetensors only. Save the model with model.save_pretrained(folder), "
                "which writes safetensors."
            )
        raise FileNotFoundError(
            f"{folder} holds no {SAFE_WEIGHTS_NAME}; save the trained model there first (trainer.save_model())."
        )
    if not (folder / CONFIG_NAME).is_file():
        raise FileNotFoundError(f"{folder} has no {CONFIG_NAME}; save the model with save_pretrained.")
    files.append(CONFIG_NAME)
    if (folder / IMAGE_PROCESSOR_NAME).is_file():
        files.append(IMAGE_PROCESSOR_NAME)
    else:
        logger.warning(
            "%s has no %s: users will have to guess the preprocessing.", folder, IMAGE_PROCESSOR_NAME
        )
    files.append(CARD_FILE)
    if with_results:
        files.append(RESULTS_FILE)
    return tuple(files) + _quantized_model_files(folder)


def _quantized_model_files(folder: Path) -> tuple[str, ...]:
    """A QAT run's quantized model (``qat_model/``, `hf_cd.quant.save_quantized`): the model its card's QAT row measured."""
    from hf_cd.quant.saving import QAT_MODEL_DIR, QUANTIZATION_FILE, QUANTIZERS_FILE

    subfolder = folder / QAT_MODEL_DIR
    names = (CONFIG_NAME, SAFE_WEIGHTS_NAME, QUANTIZATION_FILE, QUANTIZERS_FILE)
    if not all((subfolder / name).is_file() for name in names):
        return ()
    return tuple(f"{QAT_MODEL_DIR}/{name}" for name in names)


def _card_for_upload(folder: Path, repo_id: str, results: dict | None) -> str:
    """The card regenerated from ``results`` with the repo id, as `Trainer.push_to_hub` regenerates its card.

    Without results (results.json missing, unreadable or an earlier run's), the README.md that is
    already there is used as is.
    """
    card_path = folder / CARD_FILE
    if results is not None:
        return str(build_model_card(results, repo_id, **user_card_metadata(card_path)))
    if not card_path.is_file():
        raise FileNotFoundError(
            f"{folder} has neither {RESULTS_FILE} nor {CARD_FILE}; write a card first with "
            "hf_cd.hub.write_model_card(output_dir, results) or CDTrainer.create_model_card()."
        )
    text = card_path.read_text(encoding="utf-8-sig")
    try:
        ModelCard(text)
    except (ValueError, yaml.YAMLError, KeyError, TypeError) as error:
        raise ModelCardError(
            f"{card_path} is not a valid model card ({type(error).__name__}); regenerate it."
        ) from None
    return text


def push_cd_model(
    repo_id: str,
    folder_path: str | os.PathLike,
    *,
    private: bool | None = None,
    dry_run: bool = False,
    regenerate_card: bool = False,
    token: str | None = None,
    revision: str | None = None,
    commit_message: str = "Upload CD-trained model (hf-cd)",
) -> HubUpload:
    """Create ``repo_id`` if needed and upload the checkpoint in ``folder_path`` with its model card.

    The arguments follow ``huggingface_hub.upload_folder(repo_id=..., folder_path=...)``; every
    flag is keyword-only. Only the weights (safetensors), ``config.json``, the image processor
    config, ``README.md``, ``results.json`` and a QAT run's quantized model (``qat_model/``) are
    sent: no checkpoints, optimizer states, ``training_args.bin`` or plots.

    The card: a ``README.md`` that hf-cd wrote (its metadata has an ``hf_cd`` block) is regenerated
    from ``results.json`` so that its snippets name ``repo_id``, and rewritten locally (logged). A
    ``README.md`` that you wrote is uploaded as it is and never rewritten, unless
    ``regenerate_card=True`` (which says so). A ``results.json`` older than the weights belongs to an
    earlier run, so it is neither uploaded nor used, and the README.md already there goes up as is.
    ``dry_run=True`` prints and returns the exact files and card, without any network access and
    without writing anything. Without ``token`` the stored login (``hf auth login`` / ``HF_TOKEN``)
    is used, and a missing one is a `HubAccessError`.
    """
    if Path(repo_id).expanduser().is_dir() and not Path(folder_path).expanduser().is_dir():
        warnings.warn(  # the order of earlier releases: push_cd_model(output_dir, repo_id)
            "push_cd_model(output_dir, repo_id) is deprecated: the repo id comes first, as in "
            "huggingface_hub.upload_folder(repo_id=..., folder_path=...).",
            FutureWarning,
            stacklevel=2,
        )
        repo_id, folder_path = os.fspath(folder_path), repo_id
    folder = Path(folder_path)
    try:
        validate_repo_id(repo_id)
    except HFValidationError as error:
        raise ValueError(f"{repo_id!r} is not a valid Hub repo id (user/name): {error}") from None
    card_path = folder / CARD_FILE
    user_card = card_path.is_file() and not is_hf_cd_card(card_path)
    results = fresh_results(folder) if folder.is_dir() else None
    keep_user_card = user_card and not regenerate_card
    plan = HubUpload(
        repo_id=repo_id,
        folder=folder,
        files=_shareable_files(folder, with_results=results is not None),
        card=_card_for_upload(folder, repo_id, None if keep_user_card else results),
        private=bool(private),
    )
    if keep_user_card:
        logger.info(
            "%s was not written by hf-cd: it is uploaded as it is (regenerate_card=True replaces it).",
            card_path,
        )
    if dry_run:
        print(f"push_cd_model dry run: nothing is uploaded.\n{plan.describe()}", flush=True)
        return plan
    check_card_replaceable(folder / CARD_FILE)  # before the repository is created
    # token=True: huggingface_hub uses the stored login, and raises LocalTokenNotFoundError without one
    auth = token if token is not None else True
    with hub_errors(
        f"push to {repo_id!r}", token, offline_hint="pass dry_run=True to see what would be uploaded"
    ):
        repo = create_repo(repo_id, token=auth, private=private, exist_ok=True)
        if not keep_user_card and (
            not card_path.is_file() or card_path.read_text(encoding="utf-8-sig") != plan.card
        ):
            if user_card:
                logger.warning("Replacing your %s with the generated card (regenerate_card=True).", card_path)
            else:
                logger.info("Rewriting %s so that its snippets name %s.", card_path, repo_id)
            atomic_write_text(card_path, plan.card)
        commit = upload_folder(
            repo_id=repo.repo_id,
            folder_path=folder,
            allow_patterns=list(plan.files),
            commit_message=commit_message,
            token=auth,
            revision=revision,
        )
    logger.info("Uploaded %d files to %s", len(plan.files), commit.commit_url)
    return dataclasses.replace(plan, commit_url=commit.commit_url)
