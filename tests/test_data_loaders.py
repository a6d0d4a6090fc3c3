"""Loaders on small trees written to tmp dirs: VOC (palette labels), Cityscapes, folders, parquet."""

import json

import datasets
import numpy as np
import pytest
from PIL import Image

from cps_hf.data import (
    CITYSCAPES_CLASSES,
    DEMO_CLASSES,
    VOC_CLASSES,
    DatasetError,
    EvalTransform,
    build_datasets,
    load_cityscapes,
    load_hub_dataset,
    load_image_folder,
    load_voc,
    make_demo_voc,
    voc_palette,
)


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    make_demo_voc(root, num_train=12, num_val=4, size=(32, 40), seed=3)
    return root


def test_voc_root_variants_and_demo_classes(demo_root):
    for root in (demo_root, demo_root / "VOCdevkit", demo_root / "VOCdevkit" / "VOC2012"):
        ds = load_voc(root, "train")
        assert len(ds) == 12 and ds.column_names == ["image", "label", "id"]
    bundle = build_datasets("voc", demo_root, labeled=4, seed=0)
    assert bundle.class_names == DEMO_CLASSES  # classes.json replaces the 21 VOC classes
    assert (len(bundle.labeled), len(bundle.unlabeled), len(bundle.val)) == (4, 8, 4)


def test_voc_palette_labels_decode_to_indices(demo_root):
    ds = load_voc(demo_root, "val")
    label = ds[0]["label"]
    assert label.mode == "P"
    values = set(np.unique(np.asarray(label)).tolist())
    assert 255 in values and values - {255} <= set(range(len(DEMO_CLASSES)))
    # the palette would turn indices into colours; the decoded array must be the indices
    rgb_values = set(np.unique(np.asarray(label.convert("L"))).tolist())
    assert values != rgb_values
    aug = load_voc(demo_root, "train_aug")[0]["label"]  # SegmentationClassAug: plain index PNG, no border
    assert 255 not in np.asarray(aug)


def test_voc_tree_without_lists_uses_bundled_ids(tmp_path):
    voc = tmp_path / "VOC2012"
    (voc / "JPEGImages").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(voc / "JPEGImages" / "2007_000033.jpg")
    with pytest.raises(DatasetError, match=r"1448 image file\(s\) missing"):
        load_voc(tmp_path, "val")  # bundled val list of 1449 ids; only one present


def test_voc_without_classes_json_has_voc_classes(tmp_path):
    voc = tmp_path / "VOCdevkit" / "VOC2012"
    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (voc / sub).mkdir(parents=True)
    Image.new("RGB", (10, 8), (200, 10, 10)).save(voc / "JPEGImages" / "a.jpg")
    label = Image.fromarray(np.full((8, 10), 15, np.uint8), mode="P")
    label.putpalette(voc_palette())
    label.save(voc / "SegmentationClass" / "a.png")
    (voc / "ImageSets/Segmentation/val.txt").write_text("a\r\n")
    bundle = build_datasets("voc", tmp_path, labeled=None, train_split="val", val_split="val")
    assert bundle.class_names == VOC_CLASSES
    assert EvalTransform()(bundle.val[0])["labels"].unique().tolist() == [15]


def _write_cityscapes(root, split, names, label_ids, train_ids=False):
    for name, value in zip(names, label_ids):
        city = name.split("_")[0]
        (root / "leftImg8bit" / split / city).mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (16, 8), (9, 9, 9)).save(root / "leftImg8bit" / split / city / f"{name}_leftImg8bit.png")
        if value is None:
            continue
        (root / "gtFine" / split / city).mkdir(parents=True, exist_ok=True)
        array = np.array(value, dtype=np.uint8).reshape(8, 16)
        suffix = "labelTrainIds" if train_ids else "labelIds"
        Image.fromarray(array, mode="L").save(root / "gtFine" / split / city / f"{name}_gtFine_{suffix}.png")


def test_cityscapes_labelids_become_trainids(tmp_path):
    # road=7 -> 0, car=26 -> 13, unlabeled=0 -> 255, license plate=-1 style ids -> 255
    row = [7] * 4 + [26] * 4 + [0] * 4 + [24] * 4  # person=24 -> 11
    _write_cityscapes(tmp_path / "cs", "train", ["jena_000001_000019"], [row * 8])
    ds = load_cityscapes(tmp_path / "cs", "train", label_cache_dir=tmp_path / "cache")
    label = np.asarray(ds[0]["label"])
    assert label[0].tolist() == [0] * 4 + [13] * 4 + [255] * 4 + [11] * 4
    assert ds[0]["id"] == "jena_000001_000019" and len(CITYSCAPES_CLASSES) == 19


def test_cityscapes_prefers_train_id_files_and_train_extra_is_unlabeled(tmp_path):
    _write_cityscapes(tmp_path, "val", ["lindau_000000_000019"], [[5] * 128], train_ids=True)
    assert np.asarray(load_cityscapes(tmp_path, "val")[0]["label"]).max() == 5
    _write_cityscapes(tmp_path, "train_extra", ["aachen_000000_000001", "bonn_000000_000002"], [None, None])
    extra = load_cityscapes(tmp_path, "train_extra")
    assert len(extra) == 2 and extra[0]["label"] is None


def test_image_folder_maps_ignore_index_and_unlabeled_split(tmp_path):
    (tmp_path / "classes.json").write_text(json.dumps({"classes": ["sky", "tree", "road"], "ignore_index": 9}))
    for split in ("train", "extra"):
        (tmp_path / split / "images").mkdir(parents=True)
        Image.new("RGB", (6, 4)).save(tmp_path / split / "images" / "x1.png")
    (tmp_path / "train" / "labels").mkdir()
    Image.fromarray(np.array([[0, 1, 2, 9, 9, 2]] * 4, np.uint8)).save(tmp_path / "train" / "labels" / "x1.png")
    ds = load_image_folder(tmp_path, "train", label_cache_dir=tmp_path / "cache")
    assert np.asarray(ds[0]["label"])[0].tolist() == [0, 1, 2, 255, 255, 2]
    assert load_image_folder(tmp_path, "extra")[0]["label"] is None
    (tmp_path / "train" / "images" / "x2.jpg").write_bytes(b"")
    with pytest.raises(DatasetError, match=r"x2\.png"):
        load_image_folder(tmp_path, "train")


def test_empty_split_and_bad_classes_file(tmp_path):
    (tmp_path / "val" / "images").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no classes.json"):
        load_image_folder(tmp_path, "val")
    (tmp_path / "classes.json").write_text(json.dumps({"classes": ["a", "b"], "ignore_index": 1}))
    with pytest.raises(DatasetError, match="ignore_index"):
        load_image_folder(tmp_path, "val")
    (tmp_path / "classes.json").write_text(json.dumps({"classes": ["a", "b"]}))
    with pytest.raises(DatasetError, match="empty"):
        load_image_folder(tmp_path, "val")


def test_parquet_dataset_loads_map_style_and_streaming(tmp_path):
    images = [Image.new("RGB", (8, 6), (i, 0, 0)) for i in range(5)]
    labels = [Image.fromarray(np.full((6, 8), i % 3, np.uint8)) for i in range(5)]
    features = datasets.Features({"pixels": datasets.Image(), "mask": datasets.Image()})
    datasets.Dataset.from_dict({"pixels": images, "mask": labels}, features=features).to_parquet(tmp_path / "d.parquet")
    kw = dict(image_column="pixels", label_column="mask", data_files=str(tmp_path / "d.parquet"))
    ds = load_hub_dataset("parquet", "train", **kw)
    assert len(ds) == 5 and ds[3]["id"] == "3" and np.asarray(ds[4]["label"]).max() == 1
    streamed = load_hub_dataset("parquet", "train", streaming=True, **kw)
    assert isinstance(streamed, datasets.IterableDataset)
    assert [row["id"] for row in streamed] == ["0", "1", "2", "3", "4"]
    with pytest.raises(DatasetError, match="column 'nope'"):
        load_hub_dataset("parquet", "train", image_column="nope", data_files=str(tmp_path / "d.parquet"))
