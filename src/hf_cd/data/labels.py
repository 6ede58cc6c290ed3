"""Label names from a dataset's `ClassLabel` onto a model config, so checkpoints say "Sneaker", not 7."""

from __future__ import annotations

from typing import Any

from datasets import ClassLabel, Dataset, DatasetDict


def class_label_of(source: ClassLabel | Dataset | DatasetDict, label_column: str = "label") -> ClassLabel:
    """The `ClassLabel` of ``source`` (a feature, a split, or every split of a `DatasetDict`)."""
    if isinstance(source, ClassLabel):
        return source
    dataset = next(iter(source.values())) if isinstance(source, DatasetDict) else source
    feature = dataset.features.get(label_column)
    if not isinstance(feature, ClassLabel):
        raise ValueError(
            f"Column {label_column!r} is {feature!r}, not a ClassLabel; load the data with "
            "hf_cd.data.load_image_dataset, which always gives a ClassLabel with names."
        )
    return feature


def label_mapping(source: ClassLabel | Dataset | DatasetDict, label_column: str = "label") -> dict[str, Any]:
    """``num_labels``, ``id2label`` and ``label2id`` for ``from_pretrained(..., **label_mapping(ds))``."""
    names = class_label_of(source, label_column).names
    return {
        "num_labels": len(names),
        "id2label": dict(enumerate(names)),
        "label2id": {name: index for index, name in enumerate(names)},
    }


def set_label_mapping(
    config: Any, source: ClassLabel | Dataset | DatasetDict, label_column: str = "label"
) -> Any:
    """Set ``num_labels`` / ``id2label`` / ``label2id`` on a model config in place, and return it.

    Do this before building the model: an existing classifier head keeps its old size.
    """
    for key, value in label_mapping(source, label_column).items():
        setattr(config, key, value)
    return config
