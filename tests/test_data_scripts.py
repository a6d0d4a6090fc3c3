"""scripts/check_dataset.py finds every problem; the demo tree is deterministic per seed."""

import hashlib
import importlib.util
from pathlib import Path

import numpy as np
from PIL import Image

from cps_hf.data import make_demo_voc

ROOT = Path(__file__).resolve().parents[1]


def _script(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
    assert check.main(["--dataset", "voc", "--root", str(tmp_path), "--splits", "val"]) == 1
    out = capsys.readouterr().out
    assert "demo_000006.png: label values [9]" in out and "demo_000007.jpg: truncated JPEG" in out
