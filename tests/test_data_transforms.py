"""The paper's train transform (flip/scale/normalise/crop with pads) and the eval transform."""

import numpy as np
import pytest
import torch
from PIL import Image

from cps_hf.data import DatasetError, EvalTransform, TrainTransform
from cps_hf.data.transforms import normalisation_table

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _coded_item(height=24, width=32):
    """Image whose red channel encodes the label, so image/label alignment can be checked."""
    label = (np.arange(width)[None, :] // 8 + np.zeros((height, 1), int)).astype(np.uint8)  # classes 0..3 in columns
    image = np.zeros((height, width, 3), np.uint8)
    image[..., 0] = label * 60
    image[..., 1] = np.arange(height)[:, None] * 5
    return {"image": Image.fromarray(image), "label": Image.fromarray(label), "id": "x"}


def test_train_output_types_shapes_and_alignment():
    transform = TrainTransform(crop_size=16, scales=(1.0, 1.5, 2.0))
    table = normalisation_table(MEAN, STD)
    flipped_seen = set()
    for seed in range(12):
        out = transform(_coded_item(), rng=np.random.default_rng(seed))
        pixels, labels = out["pixel_values"], out["labels"]
        assert pixels.dtype == torch.float32 and pixels.shape == (3, 16, 16)
        assert labels.dtype == torch.int64 and labels.shape == (16, 16)
        # nearest-neighbour label vs bilinear image: compare away from class edges via red value
        for cls in labels.unique().tolist():
            reds = pixels[0][labels == cls]
            assert torch.isclose(reds.median(), torch.tensor(table[0][cls * 60]), atol=0.3)
        flipped_seen.add(bool(labels[0, 0] > labels[0, -1]))
    assert flipped_seen == {True, False}  # both flipped and unflipped crops occur


def test_small_scale_pads_image_with_zero_and_label_with_255():
    transform = TrainTransform(crop_size=40, scales=(0.5,), flip=False)
    out = transform(_coded_item(), rng=np.random.default_rng(0))
    # 24x32 at 0.5 -> 12x16, centred in 40x40: pad rows 0..13, cols 0..11
    assert torch.all(out["pixel_values"][:, :14] == 0) and torch.all(out["labels"][:14] == 255)
    assert torch.all(out["labels"][14:26, 12:28] != 255) and torch.all(out["labels"][26:] == 255)


def test_scale_range_unlabeled_items_and_determinism():
    transform = TrainTransform(crop_size=8, scales=(0.8, 1.6))
    item = _coded_item()
    del item["label"]
    a = transform(item, rng=np.random.default_rng(5))
    b = transform(item, rng=np.random.default_rng(5))
    assert set(a) == {"pixel_values"} and torch.equal(a["pixel_values"], b["pixel_values"])
    assert 0.8 <= transform.sample_scale(np.random.default_rng(1)) <= 1.6


def test_eval_is_whole_image_and_deterministic():
    out = EvalTransform()(_coded_item())
    assert out["pixel_values"].shape == (3, 24, 32) and out["labels"].shape == (24, 32) and out["id"] == "x"
    expected = (np.asarray(_coded_item()["image"], np.float32) / 255 - MEAN) / STD
    assert np.allclose(out["pixel_values"].permute(1, 2, 0).numpy(), expected, atol=1e-5)


def test_bad_inputs_name_the_file(tmp_path):
    Image.new("RGB", (10, 10)).save(tmp_path / "a.jpg")
    Image.new("L", (10, 9)).save(tmp_path / "a.png")
    with pytest.raises(DatasetError, match=r"a\.png: image is 10x10 but its label is 10x9"):
        EvalTransform()({"image": {"path": str(tmp_path / "a.jpg"), "bytes": None}, "label": str(tmp_path / "a.png")})
    Image.fromarray(np.full((10, 10), 7, np.uint8)).save(tmp_path / "b.png")
    with pytest.raises(DatasetError, match=r"b\.png: label values \[7\] are outside the 6 classes"):
        EvalTransform(num_classes=6)({"image": str(tmp_path / "a.jpg"), "label": str(tmp_path / "b.png")})
    data = (tmp_path / "a.jpg").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match=r"cut\.jpg: truncated"):
        TrainTransform(crop_size=8)({"image": str(tmp_path / "cut.jpg")})
    (tmp_path / "junk.jpg").write_bytes(b"not an image")
    with pytest.raises(DatasetError, match=r"junk\.jpg: cannot decode image"):
        TrainTransform(crop_size=8)({"image": str(tmp_path / "junk.jpg")})
    with pytest.raises(DatasetError, match=r"gone\.jpg: file not found"):
        TrainTransform(crop_size=8)({"image": str(tmp_path / "gone.jpg")})
    Image.new("RGB", (10, 10)).save(tmp_path / "rgb.png")
    with pytest.raises(DatasetError, match=r"rgb\.png: label must be a class-index image"):
        EvalTransform()({"image": str(tmp_path / "a.jpg"), "label": str(tmp_path / "rgb.png")})
