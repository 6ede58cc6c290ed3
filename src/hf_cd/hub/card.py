"""Write the model card of a CD-trained checkpoint: facts → metadata + markdown → ``README.md``.

The three steps live in their own modules: `hf_cd.hub.card_facts` gathers what a run measured,
`hf_cd.hub.card_metadata` builds the YAML metadata (``model-index``), `hf_cd.hub.card_render` the
markdown. This module puts them together and writes the file, never over a card hf-cd did not write.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, constants

from hf_cd.files import atomic_write_text
from hf_cd.hub.card_facts import gather_card_facts, results_from_table
from hf_cd.hub.card_metadata import CARD_TAGS, CD_TAGS, RETIRED_TAGS, card_metadata
from hf_cd.hub.card_render import card_template, template_values
from hf_cd.hub.errors import ModelCardError

CARD_FILE = constants.REPOCARD_NAME  # README.md


def build_model_card(
    results: Mapping[str, Any],
    model_id: str,
    *,
    license: str | None = None,
    language: str | list[str] | None = None,
    tags: Sequence[str] = (),
) -> ModelCard:
    """The card of a run, as a `huggingface_hub.ModelCard` rendered from `card_template`.

    ``results`` has the shape of the recipe's ``results.json``; every section except ``cd_settings``
    is optional. ``model_id`` is the Hub repo id (or the folder name) that the loading snippets name.
    ``license``, ``language`` and ``tags`` (added to the card's own tags) go into the metadata as given.
    """
    facts = gather_card_facts(results)
    metadata = card_metadata(facts, model_id, license=license, language=language, tags=tags)
    return ModelCard.from_template(metadata, template_str=card_template(), **template_values(facts, model_id))


def write_model_card(
    output_dir: str | os.PathLike,
    results: Mapping[str, Any] | Iterable[Mapping[str, Any]],
    *,
    repo_id: str | None = None,
    license: str | None = None,
    language: str | list[str] | None = None,
    tags: Sequence[str] = (),
) -> Path:
    """Write ``README.md`` beside the weights in ``output_dir`` and return its path.

    ``results`` is a recipe ``results.json`` dict, or the table `hf_cd.quant.evaluate_quantized`
    returns (see `results_from_table`).

    Without ``repo_id`` the loading snippets name the folder. `push_cd_model` rewrites the card with
    the repo id and keeps the ``license``, ``language`` and extra ``tags`` written here.
    """
    folder = Path(output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    if not isinstance(results, Mapping):
        results = results_from_table(results, folder)
    card = build_model_card(
        results, repo_id or folder.resolve().name, license=license, language=language, tags=tags
    )
    return write_card_file(folder / CARD_FILE, str(card))


def is_hf_cd_card(path: Path) -> bool:
    """Whether the card at ``path`` was written by hf-cd: its metadata has the ``hf_cd`` block (every hf-cd
    card has it; a tag alone is no proof, users tag their own cards ``vision-transformer`` too)."""
    try:
        data = ModelCard.load(path).data.to_dict()
    except Exception:  # unreadable, or no metadata: not a card hf-cd wrote
        return False
    return isinstance(data.get("hf_cd"), dict)


def check_card_replaceable(path: Path) -> None:
    """Refuse (`ModelCardError`) a README.md that exists and that hf-cd did not write."""
    if path.exists() and not is_hf_cd_card(path):
        raise ModelCardError(
            f"{path} exists and is not an hf-cd model card; it would be overwritten. Move it away, or write "
            "the card into the folder that holds the model the card describes."
        )


def write_card_file(path: Path, text: str) -> Path:
    """Write a card whole (temporary file + `os.replace`), never over a README.md that hf-cd did not write."""
    check_card_replaceable(path)
    return atomic_write_text(path, text)


def user_card_metadata(card_path: Path) -> dict[str, Any]:
    """The ``license``, ``language`` and extra ``tags`` a user put on an existing card, to keep on rewrite."""
    if not card_path.is_file():
        return {}
    try:
        data = ModelCard.load(card_path).data
    except Exception:  # an unreadable card has nothing to keep; the caller reports invalid cards
        return {}
    ours = (*CARD_TAGS, *CD_TAGS, *RETIRED_TAGS)  # the model type tag comes back deduplicated
    tags = [t for t in (data.tags or []) if t not in ours]
    return {"license": data.license, "language": data.language, "tags": tags}
