"""`load_image_dataset` on local fixtures: every Hub mapping, local directories, carving, bad input."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import replace

import numpy as np
import pytest
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, Value

import hf_cd.data.fashion_mnist as fashion_mnist_module
import hf_cd.data.loading as loading
from data_fixtures import HUB_FIXTURES, FakeHub, HubFixture, fgvc_aircraft_hub, png_bytes, write_png
from hf_cd.data import (
    DATASETS,
    SPLITS,
    CorruptImageError,
    DatasetSchemaError,
    EmptySplitError,
    UnknownDatasetError,
    load_image_dataset,
    stratified_split_indices,
    with_image_transforms,
)
from hf_cd.data.images import decode_image, find_corrupt_images


@pytest.fixture
def serve(monkeypatch, tmp_path):
    """Install a fixture as "the Hub"; Debian's Fashion-MNIST is hidden so the Hub path is taken."""
    monkeypatch.setattr(fashion_mnist_module, "DEBIAN_FASHION_MNIST_DIR", tmp_path / "no-debian-files")

    def install(fixture: HubFixture) -> FakeHub:
        hub = FakeHub(fixture)
        monkeypatch.setattr(loading, "load_dataset", hub)
        return hub

    return install


def _label_counts(dataset: Dataset) -> Counter:
    return Counter(dataset.with_format("numpy")[:]["label"].tolist())


def _fixture_label_counts(fixture: HubFixture) -> Counter:
    counts = Counter()
    for split in fixture.dataset.values():
        counts.update(split.with_format("numpy")[:][fixture.label_column].tolist())
    return counts


def test_every_registered_dataset_has_a_hub_fixture():
    assert set(DATASETS) == set(HUB_FIXTURES)


@pytest.mark.parametrize("name", sorted(HUB_FIXTURES))
def test_registered_dataset_maps_its_hub_schema(name, serve):
    fixture = HUB_FIXTURES[name]()
    hub = serve(fixture)

    result = load_image_dataset(name, validation_fraction=0.2)

    assert hub.calls == [(fixture.repo_id, fixture.config, fixture.revision)]
    assert list(result) == list(SPLITS)
    for split in SPLITS:
        features = result[split].features
        assert list(features) == ["image", "label"]
        assert isinstance(features["image"], Image)
        assert isinstance(features["label"], ClassLabel)
        assert tuple(features["label"].names) == fixture.expected_names
    # No row lost or duplicated, labels kept: the union of our splits is the Hub's data.
    total = Counter()
    for split in SPLITS:
        total.update(_label_counts(result[split]))
    assert total == _fixture_label_counts(fixture)
    # The image column the registry chose (the left camera for smallNORB) is the one served.
    expected = decode_image({"bytes": png_bytes(fixture.image_mode, fixture.image_value), "path": None})
    for split in SPLITS:
        image = result[split][0]["image"]
        assert image.mode == fixture.image_mode
        assert np.array_equal(np.asarray(image), np.asarray(expected))


@pytest.mark.parametrize("label", ["variant", "family", "manufacturer"])
def test_fgvc_aircraft_label_choice(label, serve):
    fixture = fgvc_aircraft_hub(label)
    serve(fixture)
    result = load_image_dataset("fgvc_aircraft", label=label)
    assert tuple(result["train"].features["label"].names) == fixture.expected_names
    for split in SPLITS:  # FGVC ships all three splits: nothing is carved, rows map one to one
        assert _label_counts(result[split]) == Counter(
            fixture.dataset[split].with_format("numpy")[:][label].tolist()
        )


def test_fgvc_aircraft_unknown_label_lists_the_choices(serve):
    serve(fgvc_aircraft_hub())
    with pytest.raises(ValueError, match=r"'variant', 'family', 'manufacturer'"):
        load_image_dataset("fgvc_aircraft", label="model")


def test_smallnorb_other_camera_on_request(serve):
    serve(HUB_FIXTURES["smallnorb"]())
    result = load_image_dataset("smallnorb", image_column="image_rt")
    right = decode_image({"bytes": png_bytes("L", 200), "path": None})
    assert np.array_equal(np.asarray(result["test"][0]["image"]), np.asarray(right))


def test_smallnorb_category_out_of_range_is_named(serve):
    fixture = HUB_FIXTURES["smallnorb"]()
    bad_test = fixture.dataset["test"].map(
        lambda row: {"category": 7 if row["instance"] == 0 else row["category"]}
    )
    serve(replace(fixture, dataset=DatasetDict(train=fixture.dataset["train"], test=bad_test)))
    with pytest.raises(DatasetSchemaError, match=r"values from 0 to 7.*'animal'"):
        load_image_dataset("smallnorb")


def test_hub_split_missing_names_the_split(serve):
    fixture = HUB_FIXTURES["eurosat"]()
    without_test = DatasetDict(train=fixture.dataset["train"], validation=fixture.dataset["validation"])
    serve(replace(fixture, dataset=without_test))
    with pytest.raises(DatasetSchemaError, match=r"no split 'test'.*\['train', 'validation'\]"):
        load_image_dataset("eurosat")


def test_a_hub_id_under_hf_hub_offline_is_one_line_that_says_so(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UnknownDatasetError) as error:
        load_image_dataset("someone/imagenet-9000")
    message = str(error.value)
    assert "\n" not in message and "HF_HUB_OFFLINE=1" in message and "someone/imagenet-9000" in message
    for name in DATASETS:
        assert name in message
    assert "local folder" in message
    with pytest.raises(
        UnknownDatasetError, match="Did you mean 'fashion_mnist'"
    ):  # a typo of a registered name
        load_image_dataset("fashion_mnst")


@pytest.mark.parametrize("name", ["./no/such/folder", "a/b/c", "not a repo id!"])
def test_a_name_that_is_neither_a_folder_nor_a_hub_id_is_refused_before_any_download(name, monkeypatch):
    monkeypatch.setattr(loading, "load_dataset", lambda *a, **k: pytest.fail("tried to download"))
    with pytest.raises(UnknownDatasetError, match=r"(no such directory|nor a Hub dataset id)"):
        load_image_dataset(name)


def _hub_dataset(image_column: str, label_column: str) -> DatasetDict:
    features = Features({image_column: Image(), label_column: ClassLabel(names=["bean", "rust"])})
    entries = {
        image_column: [{"bytes": png_bytes("RGB", 10 * i), "path": None} for i in range(8)],
        label_column: [i % 2 for i in range(8)],
    }
    return DatasetDict(
        {split: Dataset.from_dict(entries, features=features) for split in ("train", "validation", "test")}
    )


def test_any_hub_id_loads_with_config_revision_and_transformers_column_names(monkeypatch):
    """What transformers' run_image_classification.py accepts: any id, --image_column_name / --label_column_name."""
    calls = []

    def fake_load_dataset(name, config=None, **kwargs):
        calls.append((name, config, kwargs.get("revision")))
        return _hub_dataset("img", "labels")

    monkeypatch.setattr(loading, "load_dataset", fake_load_dataset)
    result = load_image_dataset(
        "beans", config_name="default", revision="abc123", image_column="img", label="labels"
    )
    assert calls == [("beans", "default", "abc123")]
    assert set(result["train"].column_names) == {"image", "label"}
    assert result["train"].features["label"].names == ["bean", "rust"]
    with pytest.raises(DatasetSchemaError) as error:  # transformers' defaults: image and label
        load_image_dataset("beans")
    message = str(error.value)
    assert "--image_column_name 'image'" in message and "--label_column_name 'label'" in message
    assert "one of img, labels" in message


def test_a_local_folder_of_parquet_files_loads(tmp_path):
    data = _hub_dataset("image", "label")
    for split in ("train", "test"):
        data[split].to_parquet(str(tmp_path / f"{split}.parquet"))
    result = load_image_dataset(tmp_path, validation_fraction=0.25)
    assert sorted(result) == sorted(SPLITS) and result["test"].num_rows == 8
    assert isinstance(result["train"].features["image"], Image)
    assert decode_image(result["test"][0]["image"]).size == (8, 8)


def test_a_local_folder_of_csv_metadata_and_images_loads(tmp_path):
    """An imagefolder whose labels come from a metadata.csv (file_name, then any label column)."""
    lines = ["file_name,kind"]
    for i in range(8):
        write_png(tmp_path / "train" / f"{i}.png", value=20 * i)
        lines.append(f"{i}.png,{'cat' if i % 2 else 'dog'}")
    (tmp_path / "train" / "metadata.csv").write_text("\n".join(lines) + "\n")
    result = load_image_dataset(tmp_path, label="kind", validation_fraction=0.25)
    assert result["train"].features["label"].names == ["cat", "dog"]
    assert sum(split.num_rows for split in result.values()) == 8


def test_a_csv_of_relative_image_paths_reads_them_from_its_folder(tmp_path):
    for i in range(8):
        write_png(tmp_path / "pictures" / f"{i}.png", value=20 * i)
    rows = "\n".join(f"pictures/{i}.png,{i % 2}" for i in range(8))
    (tmp_path / "train.csv").write_text("path,target\n" + rows + "\n")
    result = load_image_dataset(tmp_path, image_column="path", label="target", validation_fraction=0.25)
    assert decode_image(result["train"][0]["image"]).size == (8, 8)


# --- local directories ---------------------------------------------------------------------------


def _imagefolder(root, splits=("train", "val"), classes=("cat", "dog"), per_class=6):
    for split in splits:
        for class_index, name in enumerate(classes):
            for i in range(per_class):
                write_png(root / split / name / f"{i}.png", value=40 * class_index + i)
    return root


def test_imagefolder_loads_with_directory_class_names(tmp_path):
    root = _imagefolder(tmp_path / "pets")
    result = load_image_dataset(root, cache_dir=tmp_path / "cache", validation_fraction=0.25)
    assert result["train"].features["label"].names == ["cat", "dog"]
    assert result["validation"].num_rows == 12  # the val/ directory, not carved
    assert result["train"].num_rows + result["test"].num_rows == 12  # test carved from train
    assert result["test"].num_rows == round(12 * 0.25)
    assert sorted(_label_counts(result["test"]).values()) == [1, 2]  # 1.5 per class, rounded by remainder


def test_save_to_disk_directory_loads(tmp_path):
    features = Features({"image": Image(), "label": ClassLabel(names=["a", "b"])})
    entries = [{"bytes": png_bytes("RGB", v), "path": None} for v in range(10)]
    saved = DatasetDict(
        train=Dataset.from_dict({"image": entries, "label": [0, 1] * 5}, features=features),
        test=Dataset.from_dict({"image": entries[:4], "label": [0, 1, 0, 1]}, features=features),
    )
    saved.save_to_disk(tmp_path / "saved")
    result = load_image_dataset(tmp_path / "saved", validation_fraction=0.2)
    assert result["test"].num_rows == 4
    assert result["validation"].num_rows == 2 and _label_counts(result["validation"]) == Counter({0: 1, 1: 1})
    assert np.asarray(result["test"][3]["image"]).tolist() == np.asarray(decode_image(entries[3])).tolist()


def test_single_saved_dataset_is_the_train_split(tmp_path):
    features = Features({"image": Image(), "label": ClassLabel(names=["a", "b"])})
    entries = [{"bytes": png_bytes("L", v), "path": None} for v in range(20)]
    Dataset.from_dict({"image": entries, "label": [0, 1] * 10}, features=features).save_to_disk(
        tmp_path / "one"
    )
    result = load_image_dataset(tmp_path / "one", validation_fraction=0.2)
    assert sum(result[split].num_rows for split in SPLITS) == 20
    assert result["test"].num_rows == 4 and result["validation"].num_rows == round(16 * 0.2)


def _saved(tmp_path, columns: dict, features: Features, name="custom", test=None):
    train = Dataset.from_dict(columns, features=features)
    splits = {"train": train, "test": test if test is not None else train}
    DatasetDict(splits).save_to_disk(tmp_path / name)
    return tmp_path / name


def test_missing_columns_are_named_with_the_existing_ones(tmp_path):
    features = Features({"img": Image(), "target": Value("int64")})
    columns = {"img": [{"bytes": png_bytes("L", 1), "path": None}] * 4, "target": [0, 1, 0, 1]}
    path = _saved(tmp_path, columns, features)
    with pytest.raises(DatasetSchemaError) as error:
        load_image_dataset(path)
    message = str(error.value)
    assert "--image_column_name 'image'" in message and "--label_column_name 'label'" in message
    assert "one of img, target" in message
    # Naming the columns fixes it; plain integer labels become a ClassLabel.
    result = load_image_dataset(path, image_column="img", label="target", validation_fraction=0.5)
    assert result["train"].features["label"] == ClassLabel(names=["0", "1"])


def test_string_labels_become_a_sorted_class_label(tmp_path):
    features = Features({"image": Image(), "label": Value("string")})
    columns = {"image": [{"bytes": png_bytes("L", 1), "path": None}] * 6, "label": ["dog", "cat", "emu"] * 2}
    result = load_image_dataset(_saved(tmp_path, columns, features), validation_fraction=0.5)
    assert result["test"].features["label"].names == ["cat", "dog", "emu"]
    assert result["test"].with_format("numpy")[:]["label"].tolist() == [1, 0, 2, 1, 0, 2]


def test_empty_split_is_an_error_naming_it(serve):
    fixture = HUB_FIXTURES["eurosat"]()
    empty = fixture.dataset["validation"].select([])
    serve(replace(fixture, dataset=DatasetDict({**fixture.dataset, "validation": empty})))
    with pytest.raises(EmptySplitError, match=r"Split 'validation' of eurosat .* is empty"):
        load_image_dataset("eurosat")


def test_bad_validation_fraction_is_rejected():
    with pytest.raises(ValueError, match="validation_fraction"):
        load_image_dataset("fashion_mnist", validation_fraction=1.0)


# --- corrupt images ------------------------------------------------------------------------------


def test_corrupt_image_error_names_the_file(tmp_path):
    root = _imagefolder(tmp_path / "pets", splits=("train", "test"), per_class=5)
    (root / "train" / "dog" / "broken.png").write_bytes(b"this is not a PNG")
    result = load_image_dataset(root, cache_dir=tmp_path / "cache")
    assert result.corrupt_images == {}  # nothing is checked or dropped unless asked
    entries = [entry for split in SPLITS for entry in _undecoded(result[split])]
    (broken,) = [entry for entry in entries if entry["path"].endswith("broken.png")]
    with pytest.raises(CorruptImageError, match=r"train/dog/broken\.png"):
        decode_image(broken)


def _undecoded(dataset: Dataset) -> list[dict]:
    return list(dataset.cast_column("image", Image(decode=False))["image"])


def test_corrupt_image_in_a_transformed_batch_names_the_file(tmp_path):
    from transformers import ViTImageProcessor

    root = _imagefolder(tmp_path / "pets", splits=("train", "test"), per_class=5)
    (root / "test" / "cat" / "broken.png").write_bytes(b"\x89PNG truncated")
    result = load_image_dataset(root, cache_dir=tmp_path / "cache")
    transformed = with_image_transforms(result, ViTImageProcessor(size={"height": 8, "width": 8}))
    with pytest.raises(CorruptImageError, match=r"test/cat/broken\.png"):
        transformed["test"][: transformed["test"].num_rows]


def test_skip_corrupt_images_drops_counts_and_logs(tmp_path, caplog):
    root = _imagefolder(tmp_path / "pets", splits=("train", "test"), per_class=5)
    (root / "train" / "dog" / "broken.png").write_bytes(b"not an image")
    (root / "test" / "cat" / "empty.png").write_bytes(b"")
    with caplog.at_level(logging.WARNING, logger="hf_cd.data.loading"):
        result = load_image_dataset(root, cache_dir=tmp_path / "cache", skip_corrupt_images=True)
    dropped = {
        split: [image.path.rsplit("/", 1)[-1] for image in images]
        for split, images in result.corrupt_images.items()
    }
    assert dropped == {"train": ["broken.png"], "test": ["empty.png"]}
    assert "Skipped 1 corrupt image(s) in split 'train'" in caplog.text
    assert sum(result[split].num_rows for split in ("train", "validation")) == 10
    assert result["test"].num_rows == 10
    for split in SPLITS:
        assert find_corrupt_images(result[split]) == []


def test_corrupt_embedded_image_is_reported_by_row(tmp_path):
    features = Features({"image": Image(), "label": ClassLabel(names=["a", "b"])})
    entries = [{"bytes": png_bytes("L", v), "path": None} for v in range(6)]
    entries[4] = {"bytes": b"garbage", "path": None}
    dataset = Dataset.from_dict({"image": entries, "label": [0, 1] * 3}, features=features)
    corrupt = find_corrupt_images(dataset, split="train")
    assert [(image.split, image.index, image.path) for image in corrupt] == [("train", 4, None)]
    assert "row 4" in corrupt[0].describe()


# --- splitting -----------------------------------------------------------------------------------


def test_stratified_split_is_seeded_disjoint_and_proportional():
    rng = np.random.default_rng(1)
    labels = rng.choice(4, size=1000, p=[0.5, 0.3, 0.15, 0.05])
    kept, held = stratified_split_indices(labels, 0.2, seed=7)
    again_kept, again_held = stratified_split_indices(labels, 0.2, seed=7)
    _, other_held = stratified_split_indices(labels, 0.2, seed=8)

    assert np.array_equal(held, again_held) and np.array_equal(kept, again_kept)
    assert not np.array_equal(held, other_held)
    assert np.intersect1d(kept, held).size == 0
    assert np.array_equal(np.sort(np.concatenate([kept, held])), np.arange(labels.size))
    assert held.size == round(labels.size * 0.2)
    for label in range(4):
        expected = np.sum(labels == label) * 0.2
        assert abs(np.sum(labels[held] == label) - expected) < 1.0


def test_carved_validation_preserves_class_proportions(serve):
    fixture = HUB_FIXTURES["sun397"]()  # train and test only
    serve(fixture)
    first = load_image_dataset("sun397", validation_fraction=0.2, seed=3)
    second = load_image_dataset("sun397", validation_fraction=0.2, seed=3)
    train_counts = Counter(fixture.dataset["train"].with_format("numpy")[:]["label"].tolist())
    validation_counts = _label_counts(first["validation"])
    for label, count in train_counts.items():
        assert abs(validation_counts[label] - 0.2 * count) < 1.0
    rows = {split: [entry["path"] for entry in _undecoded(first[split])] for split in SPLITS}
    assert rows["validation"] == [entry["path"] for entry in _undecoded(second["validation"])]  # seeded
    hub_train_rows = [entry["path"] for entry in _undecoded(fixture.dataset["train"])]
    assert sorted(rows["train"] + rows["validation"]) == sorted(hub_train_rows)  # a partition of train
    assert rows["test"] == [entry["path"] for entry in _undecoded(fixture.dataset["test"])]  # test untouched


def test_max_samples_give_stratified_quick_subsets(serve):
    serve(HUB_FIXTURES["eurosat"]())
    result = load_image_dataset("eurosat", max_train_samples=20, max_eval_samples=10)
    assert result["train"].num_rows == 20
    assert result["validation"].num_rows == result["test"].num_rows == 10
    assert set(_label_counts(result["train"]).values()) == {2}  # 40 rows, 10 classes: 4 each -> 2 each
    with pytest.raises(ValueError, match="positive"):
        load_image_dataset("eurosat", max_train_samples=0)


def test_a_single_class_imagefolder_is_named_as_the_cause(tmp_path):
    root = _imagefolder(tmp_path / "cats", splits=("train",), classes=("cat",))
    with pytest.raises(DatasetSchemaError, match=r"only one class directory \('cat'\).*at least two classes"):
        load_image_dataset(root, cache_dir=tmp_path / "cache")


def test_an_empty_directory_says_what_it_should_hold(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(
        EmptySplitError, match=r"holds no images or data files: expected an imagefolder tree \(train/<class>"
    ):
        load_image_dataset(empty, cache_dir=tmp_path / "cache")
