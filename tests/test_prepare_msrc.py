"""scripts/prepare_msrc.py: the bundled TextonBoost split, the Malisiewicz-Efros label decoding and the
23 -> 21 class mapping, the folder dataset it writes (read back by the trainer's loader and
check_dataset.py), and one clear error for a wrong or partial source tree, with nothing written."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cps_hf.cli import run_cli
from cps_hf.data import DatasetError, load_image_folder
from repo_modules import load

savemat = pytest.importorskip("scipy.io").savemat



def _script(name):
    return load(f"scripts/{name}.py")


msrc = _script("prepare_msrc")

# MSRC v2 labels as `newlabels` numbers them (1-based), and where MSRC-21 puts them: the published order
# (Shotton et al. 2006) without horse and mountain.
BUILDING, GRASS, HORSE, SHEEP, SKY, MOUNTAIN, AEROPLANE, BOAT = 1, 2, 5, 6, 7, 8, 9, 23
MSRC21 = ["building", "grass", "tree", "cow", "sheep", "sky", "aeroplane", "water", "face", "car", "bicycle",
          "flower", "sign", "bird", "book", "chair", "road", "cat", "dog", "body", "boat"]


def test_the_bundled_split_is_textonboosts_276_59_256_of_the_591_images():
    splits = msrc.split_ids()
    assert {split: len(ids) for split, ids in splits.items()} == {"train": 276, "val": 59, "test": 256}
    every = [sample_id for ids in splits.values() for sample_id in ids]
    assert len(set(every)) == 591  # disjoint
    assert all(re.fullmatch(r"(\d+)_(\d+)_s", sample_id) for sample_id in every)
    # MSRC v2 has 20 rows of photos (1_*, ..., 20_*), each numbered from 1 without gaps
    rows = {}
    for sample_id in every:
        row, number, _ = sample_id.split("_")
        rows.setdefault(int(row), set()).add(int(number))
    assert sorted(rows) == list(range(1, 21))
    assert all(numbers == set(range(1, len(numbers) + 1)) for numbers in rows.values())


def test_classes_are_msrc21_in_order_with_void_for_horse_mountain_and_unlabeled():
    assert msrc.MSRC21_CLASSES == MSRC21
    table = msrc.source_to_train_table()
    expected = {0: 255, BUILDING: 0, GRASS: 1, HORSE: 255, SHEEP: 4, SKY: 5, MOUNTAIN: 255, AEROPLANE: 6, BOAT: 20}
    assert {source: int(table[source]) for source in expected} == expected
    kept = [int(table[source]) for source in range(1, 24) if table[source] != 255]
    assert kept == list(range(21))
    palette = np.asarray(msrc.msrc21_palette()).reshape(256, 3)
    # MSRC's ground-truth colours: building dark red, grass green, sheep (0,128,128), boat (192,64,0), void black
    assert palette[0].tolist() == [128, 0, 0] and palette[1].tolist() == [0, 128, 0]
    assert palette[4].tolist() == [0, 128, 128] and palette[20].tolist() == [192, 64, 0]
    assert palette[255].tolist() == [0, 0, 0]


def _write_sample(msrc_root: Path, sample_id: str, seed: int, size=(12, 8)) -> np.ndarray:
    """An MSRC-like pair: a random BMP and a .mat with 4 segments (quadrants), segment 4 left
    unlabeled; returns the label the script should write."""
    width, height = size
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)).save(msrc_root / "Images" / f"{sample_id}.bmp")
    segments = np.ones((height, width), np.uint8)
    segments[:, width // 2:] = 2
    segments[height // 2:, :width // 2] = 3
    segments[height // 2:, width // 2:] = 4
    newlabels = [[GRASS, (HORSE, SHEEP, BOAT)[seed % 3], (MOUNTAIN, SKY, AEROPLANE)[seed % 3]]]
    savemat(msrc_root / "newsegmentations_mats" / f"{sample_id}_GT.mat",
            {"newseg": segments, "newlabels": np.asarray(newlabels, np.uint8)})
    expected = np.full((height, width), 255, np.uint8)
    table = {GRASS: 1, HORSE: 255, SHEEP: 4, BOAT: 20, MOUNTAIN: 255, SKY: 5, AEROPLANE: 6}
    for segment, source in enumerate(newlabels[0], start=1):
        expected[segments == segment] = table[source]
    return expected


SPLITS = {"train": ["1_1_s", "1_2_s", "2_1_s"], "val": ["3_1_s"], "test": ["4_1_s", "4_2_s"]}


@pytest.fixture
def tiny_msrc(tmp_path, monkeypatch):
    """A clone-like tree with 6 images, and a 3 / 1 / 2 split in place of the bundled lists."""
    split_dir = tmp_path / "split_lists"
    split_dir.mkdir()
    for split, name in msrc.SPLIT_FILES.items():
        (split_dir / name).write_text("".join(f"{sample_id}.bmp\n" for sample_id in SPLITS[split]))
    monkeypatch.setattr(msrc, "SPLIT_DIR", split_dir)
    clone = tmp_path / "MultiGraph_MultiLabel_Learning"
    root = clone / "MSRC_v2"
    (root / "Images").mkdir(parents=True)
    (root / "newsegmentations_mats").mkdir()
    ids = [sample_id for ids in SPLITS.values() for sample_id in ids]
    expected = {sample_id: _write_sample(root, sample_id, seed, size=(12, 8) if seed % 2 else (8, 12))
                for seed, sample_id in enumerate(ids)}
    return clone, expected


def test_it_writes_a_folder_dataset_the_trainer_and_check_dataset_read(tiny_msrc, tmp_path, capsys):
    clone, expected = tiny_msrc
    out = tmp_path / "msrc"
    report = msrc.main(["--source", str(clone), "--out", str(out)])
    assert json.loads(capsys.readouterr().out)["total_images"] == 6
    assert json.loads((out / "classes.json").read_text())["classes"] == MSRC21
    for split, ids in SPLITS.items():
        dataset = load_image_folder(out, split)
        assert sorted(dataset["id"]) == sorted(ids)
        assert (out / "splits" / f"{split}.txt").read_text().split() == ids
        for sample_id in ids:
            label = Image.open(out / split / "labels" / f"{sample_id}.png")
            assert label.mode == "P"  # palette PNG: the loaders read class ids, viewers show MSRC colours
            np.testing.assert_array_equal(np.asarray(label), expected[sample_id])
            with Image.open(clone / "MSRC_v2" / "Images" / f"{sample_id}.bmp") as bmp:
                np.testing.assert_array_equal(np.asarray(Image.open(out / split / "images" / f"{sample_id}.png")),
                                              np.asarray(bmp.convert("RGB")))  # lossless
        labels = np.concatenate([expected[i].ravel() for i in ids])
        assert report["splits"][split]["void_share"] == round(float(np.mean(labels == 255)), 4)
        assert report["splits"][split]["class_share"]["grass"] == round(float(np.mean(labels == 1)), 4)
    assert "research use" in (out / "README.md").read_text()
    check = _script("check_dataset")
    assert check.main(["--dataset", "folder", "--root", str(out), "--splits", "train", "val", "test"]) == 0


def test_the_msrc_v2_folder_itself_is_a_source_too(tiny_msrc, tmp_path):
    clone, _ = tiny_msrc
    report = msrc.prepare_msrc(clone / "MSRC_v2", tmp_path / "out")
    assert report["total_images"] == 6 and report["skipped"] == []


def _error(argv) -> str:
    with pytest.raises(DatasetError) as caught:
        msrc.main(argv)
    return str(caught.value)


def test_a_wrong_or_partial_source_is_one_line_naming_what_is_missing(tiny_msrc, tmp_path, capsys):
    clone, _ = tiny_msrc
    out = str(tmp_path / "out")
    assert "folder does not exist" in _error(["--source", str(tmp_path / "nowhere"), "--out", out])
    assert "no MSRC_v2 tree there" in _error(["--source", str(tmp_path / "split_lists"), "--out", out])
    mats = clone / "MSRC_v2" / "newsegmentations_mats"
    mats.rename(tmp_path / "mats")
    assert "has Images/ but no newsegmentations_mats/" in _error(["--source", str(clone), "--out", out])
    (clone / "MSRC_v2" / "GroundTruth").mkdir()
    assert "Microsoft's original download" in _error(["--source", str(clone), "--out", out])
    # through the command line: exit status 2 and one `error: ...` line, no traceback
    assert run_cli(msrc.main, ["--source", str(clone), "--out", out]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --source") and len(err.strip().splitlines()) == 1
    assert not Path(out).exists()


def test_every_unusable_image_is_named_and_nothing_is_written(tiny_msrc, tmp_path):
    clone, _ = tiny_msrc
    root = clone / "MSRC_v2"
    (root / "newsegmentations_mats" / "1_2_s_GT.mat").unlink()                           # image without a label
    savemat(root / "newsegmentations_mats" / "2_1_s_GT.mat", {"segments": np.ones((8, 12), np.uint8)})  # no fields
    bmp = root / "Images" / "3_1_s.bmp"
    bmp.write_bytes(bmp.read_bytes()[:80])                                                # truncated image
    savemat(root / "newsegmentations_mats" / "4_1_s_GT.mat",                              # label of another size
            {"newseg": np.ones((5, 5), np.uint8), "newlabels": np.asarray([[GRASS]], np.uint8)})
    out = tmp_path / "out"
    message = _error(["--source", str(clone), "--out", str(out)])
    assert message.splitlines()[0].endswith("pass --skip_unusable to write the rest:")
    assert "4 of the 6 MSRC images cannot be used; nothing was written" in message
    assert f"{root / 'newsegmentations_mats' / '1_2_s_GT.mat'}: missing" in message
    assert "2_1_s_GT.mat: no newseg or newlabels field" in message
    assert "3_1_s.bmp: truncated BMP" in message
    assert "4_1_s_GT.mat: label is 5x5 but" in message
    assert not out.exists()

    report = msrc.main(["--source", str(clone), "--out", str(out), "--skip_unusable"])
    assert {split: info["images"] for split, info in report["splits"].items()} == {"train": 1, "val": 0, "test": 1}
    assert report["splits"]["train"]["left_out"] == 2 and len(report["skipped"]) == 4
    assert "4_1_s_GT.mat: label is 5x5" in (out / "README.md").read_text()  # the card lists what is missing
    assert (out / "splits" / "train.txt").read_text().split() == ["1_1_s"]


def test_bad_label_values_and_a_non_empty_out_are_refused(tiny_msrc, tmp_path):
    clone, _ = tiny_msrc
    mat = clone / "MSRC_v2" / "newsegmentations_mats" / "1_1_s_GT.mat"
    savemat(mat, {"newseg": np.ones((12, 8), np.uint8), "newlabels": np.asarray([[24]], np.uint8)})
    with pytest.raises(DatasetError, match=r"newlabels holds \[24\], expected MSRC v2 labels 1..23"):
        msrc.read_msrc_label(mat)
    mat.write_bytes(b"version https://git-lfs.github.com/spec/v1\n")  # a Git LFS pointer, not the file
    with pytest.raises(DatasetError, match="cannot read this .mat file"):
        msrc.read_msrc_label(mat)
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    assert "is not empty; give a new or empty folder" in _error(["--source", str(clone), "--out", str(out)])


def test_without_scipy_it_says_how_to_get_it(tiny_msrc, tmp_path, monkeypatch):
    clone, _ = tiny_msrc
    monkeypatch.setitem(sys.modules, "scipy.io", None)  # `from scipy.io import loadmat` now raises ImportError
    assert "needs scipy: pip install scipy" in _error(["--source", str(clone), "--out", str(tmp_path / "out")])
