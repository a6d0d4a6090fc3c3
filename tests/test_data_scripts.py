"""scripts/check_dataset.py finds every problem; the demo tree is deterministic per seed."""

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cps_hf.cli import run_cli
from cps_hf.data import make_demo_voc
from repo_modules import load



def _script(name):
    return load(f"scripts/{name}.py")


def _digest(folder):
    return hashlib.sha1(b"".join(p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file())).hexdigest()


def test_demo_is_deterministic_per_seed(tmp_path):
    make_demo_voc(tmp_path / "a", num_train=6, num_val=2, seed=1)
    make_demo_voc(tmp_path / "b", num_train=6, num_val=2, seed=1)
    make_demo_voc(tmp_path / "c", num_train=6, num_val=2, seed=2)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b") != _digest(tmp_path / "c")


def test_check_dataset_reports_all_problems(tmp_path, capsys):
    voc = make_demo_voc(tmp_path, num_train=6, num_val=3, size=32, seed=0)
    check = _script("check_dataset")
    assert check.main(["--dataset", "voc", "--root", str(tmp_path), "--splits", "val"]) == 0
    assert "green" in capsys.readouterr().out  # per-class pixel table
    Image.fromarray(np.full((32, 32), 9, np.uint8)).save(voc / "SegmentationClass" / "demo_000006.png")
    data = (voc / "JPEGImages" / "demo_000007.jpg").read_bytes()
    (voc / "JPEGImages" / "demo_000007.jpg").write_bytes(data[:100])
    (voc / "SegmentationClass" / "demo_000007.png").write_bytes(b"")  # both files of one sample are named
    assert check.main(["--dataset", "voc", "--root", str(tmp_path), "--splits", "val"]) == 1
    out = capsys.readouterr().out
    assert "demo_000006.png: label values [9]" in out and "demo_000007.jpg: truncated JPEG" in out
    assert "demo_000007.png: empty file (0 bytes)" in out and "3 problem(s) in total" in out
    # The command keeps exit status 1 for problems found (2 is for a mistake in the flags).
    assert run_cli(check.main, ["--dataset", "voc", "--root", str(tmp_path), "--splits", "val", "--workers", "1"]) == 1


# ---------------------------------------------------------------- prepare_voc_aug (SBD -> train_aug)
def _fake_voc_and_sbd(root):
    """VOC tree with 4 images: v_only (VOC label), both (VOC and SBD labels), s_only (SBD label),
    and val_id (VOC val); SBD holds both and s_only as MATLAB files like benchmark_RELEASE."""
    from scipy.io import savemat

    from cps_hf.data import voc_palette

    voc = root / "VOCdevkit" / "VOC2012"
    for folder in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation", "ImageSets/SegmentationAug"):
        (voc / folder).mkdir(parents=True)
    cls_dir = root / "benchmark_RELEASE" / "dataset" / "cls"
    cls_dir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    labels = {}
    for sample_id in ("v_only", "both", "s_only", "val_id"):
        Image.fromarray(rng.integers(0, 255, (10, 14, 3), dtype=np.uint8)).save(voc / "JPEGImages" / f"{sample_id}.jpg")
        labels[sample_id] = {"voc": rng.integers(0, 21, (10, 14)).astype(np.uint8),
                             "sbd": rng.integers(0, 21, (10, 14)).astype(np.uint8)}
        labels[sample_id]["voc"][0, :3] = 255  # VOC marks boundaries
    for sample_id in ("v_only", "both", "val_id"):
        png = Image.fromarray(labels[sample_id]["voc"], mode="P")
        png.putpalette(voc_palette())
        png.save(voc / "SegmentationClass" / f"{sample_id}.png")
    for sample_id in ("both", "s_only"):
        savemat(cls_dir / f"{sample_id}.mat", {"GTcls": {"Segmentation": labels[sample_id]["sbd"],
                                                         "CategoriesPresent": np.array([1, 2])}})
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("val_id\n")
    (voc / "ImageSets" / "SegmentationAug" / "train_aug.txt").write_text("v_only\nboth\ns_only\n")
    return root, labels


def test_prepare_voc_aug_writes_train_aug_labels_from_sbd(tmp_path):
    from cps_hf.data import load_voc

    root, labels = _fake_voc_and_sbd(tmp_path)
    prepare = _script("prepare_voc_aug")
    report = prepare.main(["--voc_root", str(root), "--sbd_root", str(root / "benchmark_RELEASE"), "--num_workers", "1"])
    assert report["train_aug_ids"] == 3 and report["from_sbd"] == 1 and report["from_voc"] == 2
    aug = load_voc(root, "train_aug")
    got = {record["id"]: np.asarray(record["label"]) for record in aug}
    assert np.array_equal(got["v_only"], labels["v_only"]["voc"])
    assert np.array_equal(got["both"], labels["both"]["voc"])  # VOC's own label wins by default
    assert np.array_equal(got["s_only"], labels["s_only"]["sbd"])

    prepare.main(["--voc_root", str(root), "--sbd_root", str(root / "benchmark_RELEASE"), "--prefer", "sbd",
                  "--num_workers", "2"])
    got = {record["id"]: np.asarray(record["label"]) for record in load_voc(root, "train_aug")}
    assert np.array_equal(got["both"], labels["both"]["sbd"])
    assert not list((root / "VOCdevkit" / "VOC2012" / "SegmentationClassAug").glob("*.tmp.png"))


def test_prepare_voc_aug_names_what_is_missing_or_broken(tmp_path, capsys):
    root, _ = _fake_voc_and_sbd(tmp_path)
    prepare = _script("prepare_voc_aug")
    sbd = root / "benchmark_RELEASE"
    argv = ["--voc_root", str(root), "--sbd_root", str(sbd), "--num_workers", "1"]
    (sbd / "dataset" / "cls" / "s_only.mat").unlink()
    assert run_cli(prepare.main, argv) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: ") and "1 without a label" in error and "s_only" in error
    (sbd / "dataset" / "cls" / "s_only.mat").write_bytes(b"not a matlab file")
    assert run_cli(prepare.main, argv) == 2
    assert "s_only.mat: not an SBD class label" in capsys.readouterr().err
