"""scripts/predict.py on a tiny random-init model: masks, overlays and manifest, batching, protocols,
bad inputs, and two processes under `accelerate launch`."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cps_hf import CPSConfig, CPSForSemanticSegmentation, CPSImageProcessor
from cps_hf.errors import UserInputError
from cps_hf.inference import load_segmentation_model, predict_logits
from repo_modules import load

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "predict.py"
CLASSES = ["background", "red", "green", "blue"]
SIZES = {"wide": (40, 32), "odd": (70, 51), "tall": (33, 45)}  # (width, height)


def load_predict():
    return load("scripts/predict.py")


def write_image(path: Path, size: tuple[int, int], seed: int) -> Path:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


def save_tiny_model(folder: Path, **extra) -> str:
    torch.manual_seed(0)
    config = CPSConfig(backbone="resnet18", num_labels=len(CLASSES), id2label=dict(enumerate(CLASSES)),
                       label2id={n: i for i, n in enumerate(CLASSES)}, aspp_channels=16, decoder_channels=16,
                       low_level_channels=8, **extra)
    CPSForSemanticSegmentation(config).eval().save_pretrained(folder)
    CPSImageProcessor().save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return save_tiny_model(tmp_path_factory.mktemp("predict_model") / "model")


@pytest.fixture
def images(tmp_path):
    folder = tmp_path / "images"
    folder.mkdir()
    return [write_image(folder / f"{stem}.png", size, seed) for seed, (stem, size) in enumerate(SIZES.items())]


def direct_argmax(model_dir, path, **protocol):
    """The model's own logits on the normalised image, argmax over classes."""
    model, mean, std = load_segmentation_model(model_dir)
    rgb = np.asarray(Image.open(path).convert("RGB"), dtype=np.float64) / 255.0
    pixel_values = ((rgb - np.asarray(mean)) / np.asarray(std)).astype(np.float32).transpose(2, 0, 1)
    with torch.no_grad():
        if protocol:
            logits = predict_logits(model, torch.from_numpy(pixel_values)[None], **protocol)
        else:
            logits = model(pixel_values=torch.from_numpy(pixel_values)[None]).logits
    return logits.argmax(1)[0].numpy()


def read_manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def test_masks_overlays_and_manifest_match_the_model(model_dir, images, tmp_path, capsys):
    out = tmp_path / "out"
    records = load_predict().main(["--model", model_dir, "--inputs", str(images[0].parent), "--output_dir", str(out),
                                   "--device", "cpu"])
    manifest = read_manifest(out)
    assert manifest == json.loads(json.dumps(records))
    assert [Path(r["input"]).name for r in manifest] == sorted(p.name for p in images)
    for record in manifest:
        source = Path(record["input"])
        width, height = SIZES[source.stem]
        assert (record["width"], record["height"]) == (width, height)
        assert record["mask"] == str(out / "masks" / f"{source.stem}.png")
        with Image.open(record["mask"]) as mask_file:
            assert mask_file.mode == "P" and mask_file.size == (width, height)
            mask = np.asarray(mask_file)
        assert mask.max() < len(CLASSES)
        np.testing.assert_array_equal(mask, direct_argmax(model_dir, source))
        assert record["classes"] == np.unique(mask).tolist()
        assert record["class_names"] == [CLASSES[c] for c in record["classes"]]
        with Image.open(out / "overlays" / f"{source.stem}.png") as overlay_file:
            assert overlay_file.size == (width, height) and overlay_file.mode == "RGB"
    printed = capsys.readouterr().out
    assert "wrote 3 masks and overlays" in printed
    assert "protocol: whole image at its own size" in printed and "records no eval_protocol" in printed


def test_the_protocol_the_model_recorded_is_the_default(images, tmp_path, capsys):
    """As evaluate_cps.py: a model's config.eval_protocol (what the trainer evaluated with) is the default."""
    recorded = save_tiny_model(tmp_path / "recorded", eval_protocol={"mode": "slide", "crop_size": 40, "stride": 30})
    odd = images[1]
    load_predict().main(["--model", recorded, "--inputs", str(odd), "--output_dir", str(tmp_path / "out")])
    printed = capsys.readouterr().out
    assert "protocol: sliding 40 px windows, stride 30" in printed and "eval_protocol" in printed
    mask = np.asarray(Image.open(tmp_path / "out" / "masks" / "odd.png"))
    np.testing.assert_array_equal(mask, direct_argmax(recorded, odd, mode="slide", crop_size=40, stride=30))
    load_predict().main(["--model", recorded, "--inputs", str(odd), "--output_dir", str(tmp_path / "whole"),
                         "--mode", "whole", "--crop_size", "0"])
    assert "overridden by --mode --crop_size" in capsys.readouterr().out
    mask = np.asarray(Image.open(tmp_path / "whole" / "masks" / "odd.png"))
    np.testing.assert_array_equal(mask, direct_argmax(recorded, odd))


def test_same_size_images_share_a_batch(model_dir, tmp_path, monkeypatch):
    folder = tmp_path / "images"
    folder.mkdir()
    for seed, stem in enumerate(["a", "b", "c"]):  # a, b: 40x32; c: 33x45
        write_image(folder / f"{stem}.png", (40, 32) if stem != "c" else (33, 45), seed)
    predict = load_predict()
    shapes, real = [], predict.predict_class_ids
    monkeypatch.setattr(predict, "predict_class_ids",
                        lambda model, batch, *a: shapes.append(len(batch)) or real(model, batch, *a))
    predict.main(["--model", model_dir, "--inputs", str(folder / "a.png"), str(folder / "*.png"), "--output_dir",
                  str(tmp_path / "out"), "--batch_size", "4"])
    assert shapes == [2, 1]  # a and b together, c alone; a listed twice is predicted once
    assert [Path(r["input"]).stem for r in read_manifest(tmp_path / "out")] == ["a", "b", "c"]
    for stem in "abc":
        mask = np.asarray(Image.open(tmp_path / "out" / "masks" / f"{stem}.png"))
        # a batch of two may move near-tied logits by float noise: compare where the choice is clear
        assert (mask == direct_argmax(model_dir, folder / f"{stem}.png")).mean() > 0.99


def test_slide_flip_protocol(model_dir, images, tmp_path):
    odd = images[1]
    load_predict().main(["--model", model_dir, "--inputs", str(odd), "--output_dir", str(tmp_path / "out"),
                         "--mode", "slide", "--crop_size", "40", "--stride", "30", "--flip", "--scales", "0.75", "1.0"])
    mask = np.asarray(Image.open(tmp_path / "out" / "masks" / "odd.png"))
    expected = direct_argmax(model_dir, odd, mode="slide", crop_size=40, stride=30, flip=True, scales=(0.75, 1.0))
    assert mask.shape == (51, 70)
    np.testing.assert_array_equal(mask, expected)


def test_unreadable_image_stops_or_is_skipped(model_dir, images, tmp_path, capsys):
    predict = load_predict()
    bad = images[0].parent / "broken.png"
    bad.write_bytes(b"not a png at all")
    common = ["--model", model_dir, "--inputs", str(images[0].parent)]
    with pytest.raises(UserInputError, match=r"broken\.png: cannot decode image.*--skip_unreadable"):
        predict.main([*common, "--output_dir", str(tmp_path / "stop")])
    assert not (tmp_path / "stop" / "manifest.jsonl").exists()
    predict.main([*common, "--output_dir", str(tmp_path / "skip"), "--skip_unreadable"])
    manifest = read_manifest(tmp_path / "skip")
    assert [Path(r["input"]).name for r in manifest] == ["broken.png", "odd.png", "tall.png", "wide.png"]
    assert "cannot decode image" in manifest[0]["skipped"] and "mask" not in manifest[0]
    assert not (tmp_path / "skip" / "masks" / "broken.png").exists()
    assert f"skipped {bad}" in capsys.readouterr().out


def test_bad_inputs_and_model_names_give_one_line_errors(model_dir, tmp_path):
    predict = load_predict()
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    out = ["--output_dir", str(tmp_path / "out")]
    image = str(write_image(tmp_path / "x.png", (8, 8), 0))
    cases = [
        (["--model", model_dir, "--inputs", str(empty)], f"--inputs {empty}: folder holds no image files"),
        (["--model", model_dir, "--inputs", str(tmp_path / "*.jpg")], "pattern matches no files"),
        (["--model", model_dir, "--inputs", str(tmp_path / "missing.png")], "missing.png: no such file or folder"),
        (["--model", str(tmp_path / "no" / "such" / "model"), "--inputs", image], "such/model: folder does not exist"),
        (["--model", model_dir, "--inputs", image, "--mode", "slide"], "slide protocol needs a crop"),
        (["--model", model_dir, "--inputs", image, "--batch_size", "0"], "--batch_size must be at least 1"),
    ]
    for argv, message in cases:
        with pytest.raises(UserInputError) as raised:
            predict.main([*argv, *out])
        assert message in str(raised.value) and "\n" not in str(raised.value), str(raised.value)
    (tmp_path / "dup").mkdir()
    write_image(tmp_path / "dup" / "x.jpg", (8, 8), 1)
    with pytest.raises(UserInputError, match="share the stem 'x'"):
        predict.main(["--model", model_dir, "--inputs", image, str(tmp_path / "dup"), *out])


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_device_cuda_without_a_gpu(model_dir, images, tmp_path):
    with pytest.raises(UserInputError, match="--device cuda: no CUDA device"):
        load_predict().main(["--model", model_dir, "--inputs", str(images[0]), "--output_dir", str(tmp_path),
                             "--device", "cuda"])


def test_command_line_error_is_one_line(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    completed = subprocess.run([sys.executable, str(SCRIPT), "--model", str(tmp_path / "a" / "b" / "c"), "--inputs",
                                str(write_image(tmp_path / "x.png", (8, 8), 0)), "--output_dir", str(tmp_path / "o")],
                               env=env, capture_output=True, text=True, timeout=120)
    assert completed.returncode == 2
    assert completed.stderr.strip() == f"error: --model {tmp_path / 'a' / 'b' / 'c'}: folder does not exist"


@pytest.mark.slow
def test_two_processes_take_disjoint_shares(model_dir, images, tmp_path):
    """`accelerate launch --num_processes 2` on CPU (gloo): every image predicted once, one manifest."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "CUDA_VISIBLE_DEVICES": ""}
    out = tmp_path / "out"
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(SCRIPT),
               "--model", model_dir, "--inputs", str(images[0].parent), "--output_dir", str(out)]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    manifest = read_manifest(out)
    assert [Path(r["input"]).stem for r in manifest] == ["odd", "tall", "wide"]
    for record in manifest:
        mask = np.asarray(Image.open(record["mask"]))
        np.testing.assert_array_equal(mask, direct_argmax(model_dir, record["input"]))
    assert completed.stdout.count("wrote 3 masks") == 1  # the main process reports, once
