"""Inference protocols (whole, slide, scales, flip, branches) and the sharded evaluation loop, on tiny fake models."""

import os
import tempfile

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import SemanticSegmenterOutput

from cps_hf.inference import _window_starts, evaluate_model, predict_logits, shard_for_process
from cps_hf.metrics import MeanIoU


class PixelwiseModel(nn.Module):
    """1x1 conv: translation-equivariant with no border effects, so windows and padding cannot change it."""

    def __init__(self, num_labels=4, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(3, num_labels, 1)
        self.calls = []

    def forward(self, pixel_values):
        self.calls.append(tuple(pixel_values.shape))
        return SemanticSegmenterOutput(logits=self.conv(pixel_values))


class PositionModel(nn.Module):
    """Logits depend on the column index: not flip-equivariant."""

    def forward(self, pixel_values):
        width = pixel_values.shape[-1]
        ramp = torch.linspace(0, 1, width).view(1, 1, 1, width)
        return SemanticSegmenterOutput(logits=torch.cat([pixel_values[:, :1] * ramp, pixel_values[:, 1:2]], 1))


class QuarterResolutionModel(nn.Module):
    def forward(self, pixel_values):
        return (F.avg_pool2d(pixel_values, 4),)


def images(batch=2, height=37, width=53, seed=1):
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- protocols
def test_original_cityscapes_window_grid():
    assert _window_starts(1024, 800, 534) == [0, 224]
    assert _window_starts(2048, 800, 534) == [0, 534, 1068, 1248]
    assert _window_starts(800, 800, 534) == [0]


@pytest.mark.parametrize("crop,stride", [(16, 11), (20, 20), ((16, 24), (5, 7)), (16, None)])
def test_slide_equals_whole_for_a_pixelwise_model(crop, stride):
    model, x = PixelwiseModel(), images()
    whole = predict_logits(model, x, mode="whole")
    slide = predict_logits(model, x, mode="slide", crop_size=crop, stride=stride)
    assert slide.shape == whole.shape == (2, 4, 37, 53)
    torch.testing.assert_close(slide, whole, rtol=1e-5, atol=1e-5)
    assert all(call[-2:] == ((crop, crop) if isinstance(crop, int) else crop) for call in model.calls[1:])


def test_whole_pads_centred_to_the_crop_and_crops_back():
    seen = []

    def echo(pixel_values):  # logits = input, so any misplaced margin shows up
        seen.append(tuple(pixel_values.shape))
        return SemanticSegmenterOutput(logits=pixel_values)

    x = images(height=10, width=13) + 5.0
    out = predict_logits(echo, x, mode="whole", crop_size=16)
    assert seen == [(2, 3, 16, 16)]
    torch.testing.assert_close(out, x)
    padded_input = []
    predict_logits(lambda pixel_values: padded_input.append(pixel_values) or (pixel_values,), x, crop_size=16)
    assert padded_input[0][0, 0, 0, 0] == 0 and padded_input[0][0, 0, 3, 1] == x[0, 0, 0, 0]  # margins 3/3, 1/2


def test_slide_on_an_image_smaller_than_the_crop_is_one_padded_window():
    model, x = PixelwiseModel(), images(height=10, width=12)
    out = predict_logits(model, x, mode="slide", crop_size=16, stride=8)
    assert model.calls == [(2, 3, 16, 16)]
    torch.testing.assert_close(out, predict_logits(model, x), rtol=1e-5, atol=1e-5)


def test_flip_averages_with_the_flipped_back_prediction():
    model, x = PositionModel(), images()
    expected = (model(x).logits + model(x.flip(-1)).logits.flip(-1)) / 2
    torch.testing.assert_close(predict_logits(model, x, flip=True), expected)
    assert not torch.allclose(predict_logits(model, x), expected)


def test_branch_average_is_the_mean_of_logits():
    first, second, x = PixelwiseModel(seed=0), PixelwiseModel(seed=1), images()
    expected = (first(x).logits + second(x).logits) / 2
    torch.testing.assert_close(predict_logits([first, second], x), expected)


def test_multi_scale_averages_logits_resized_to_the_input():
    model, x = PixelwiseModel(), images(height=32, width=48)
    half = F.interpolate(model(F.interpolate(x, size=(16, 24), mode="bilinear")).logits, size=(32, 48),
                         mode="bilinear")
    expected = (half + model(x).logits) / 2
    torch.testing.assert_close(predict_logits(model, x, scales=(0.5, 1.0)), expected)


def test_low_resolution_logits_are_upsampled_to_the_input():
    out = predict_logits(QuarterResolutionModel(), images(height=32, width=40))
    assert out.shape == (2, 3, 32, 40)


def test_bad_arguments_raise_clearly():
    model, x = PixelwiseModel(), images()
    with pytest.raises(ValueError, match="needs crop_size"):
        predict_logits(model, x, mode="slide")
    with pytest.raises(ValueError, match="mode must be"):
        predict_logits(model, x, mode="tiles")
    with pytest.raises(ValueError, match="4 classes but num_labels=21"):
        predict_logits(model, x, num_labels=21)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        predict_logits(model, x[0])



def test_model_sources_a_user_mistyped_are_one_line_user_errors(tmp_path):
    """What every script shows for --model: no huggingface_hub "Repo id must be in the form ..." for a folder."""
    from cps_hf.errors import UserInputError
    from cps_hf.inference import load_segmentation_model

    (tmp_path / "weights.bin").write_bytes(b"")
    (tmp_path / "run").mkdir()
    cases = [
        (str(tmp_path / "no" / "model"), "folder does not exist"),
        ("./no_such_model_folder_here", "folder does not exist"),
        (str(tmp_path / "weights.bin"), "is a file, not a model folder"),
        (str(tmp_path / "run"), "no config.json in that folder"),
        ("not a hub id!", "no such folder, and not a Hub model id"),
    ]
    if os.environ.get("HF_HUB_OFFLINE") == "1":  # offline: a Hub id fails at once, with the cause's first line
        cases.append(("someone/no-such-cps-model", "cannot load a segmentation model ("))
    for source, message in cases:
        with pytest.raises(UserInputError) as raised:
            load_segmentation_model(source, flag="--models")
        text = str(raised.value)
        assert text.startswith(f"--models {source}: {message}") and "\n" not in text, text


# ---------------------------------------------------------------- evaluation loop
class LabelReader(nn.Module):
    """Predicts the class written into channel 0 of the image, except where channel 1 is set."""

    def __init__(self, num_labels=3):
        super().__init__()
        self.num_labels = num_labels
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, pixel_values):
        classes = pixel_values[:, 0].round().long().clamp(0, self.num_labels - 1)
        wrong = (classes + (pixel_values[:, 1] > 0).long()) % self.num_labels
        return SemanticSegmenterOutput(logits=F.one_hot(wrong, self.num_labels).permute(0, 3, 1, 2).float())


def labelled_items(count=5, size=8, num_labels=3, seed=0):
    rng = np.random.default_rng(seed)
    items = []
    for _ in range(count):
        labels = rng.integers(0, num_labels, (size, size))
        labels[0] = 255
        pixel_values = np.zeros((3, size, size), np.float32)
        pixel_values[0] = np.where(labels == 255, 0, labels)
        pixel_values[1] = rng.random((size, size)) < 0.2  # 20% of pixels predicted wrong
        items.append({"pixel_values": torch.from_numpy(pixel_values), "labels": torch.from_numpy(labels)})
    return items


def direct_metric(items, model, num_labels=3):
    metric = MeanIoU(num_labels)
    for item in items:
        metric.add_batch(predictions=model(item["pixel_values"][None]).logits.argmax(1)[0], references=item["labels"])
    return metric.compute()


def test_evaluate_model_matches_the_metric_on_direct_predictions_and_restores_train_mode():
    items, model = labelled_items(), LabelReader()
    model.train()
    result = evaluate_model(model, items, num_labels=3, batch_size=2)
    assert model.training
    expected = direct_metric(items, model)
    for key in expected:
        np.testing.assert_array_equal(result[key], expected[key])
    assert 0.5 < result["mean_iou"] < 1.0


def test_evaluate_model_resizes_logits_to_the_labels_and_runs_slide_mode():
    items = labelled_items(count=2, size=8)
    upsampled = [{"pixel_values": F.interpolate(i["pixel_values"][None], scale_factor=2, mode="nearest")[0],
                  "labels": i["labels"]} for i in items]
    model = LabelReader()
    result = evaluate_model(model, upsampled, num_labels=3, mode="slide", crop_size=6, stride=4)
    whole = evaluate_model(model, items, num_labels=3)
    assert result["mean_iou"] == pytest.approx(whole["mean_iou"])


def test_shards_are_disjoint_and_complete():
    items = list(range(7))
    shards = [list(shard_for_process(items, rank, 3)) for rank in range(3)]
    assert sorted(sum(shards, [])) == items

    def stream():
        yield from items

    class Stream(torch.utils.data.IterableDataset):
        def __iter__(self):
            return stream()

    streamed = [list(shard_for_process(Stream(), rank, 2)) for rank in range(2)]
    assert streamed == [[0, 2, 4, 6], [1, 3, 5]]


def _gloo_evaluate(rank, world_size, init_file, out_dir):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        loader = torch.utils.data.DataLoader(labelled_items(), batch_size=2)  # re-sharded per process
        result = evaluate_model(LabelReader(), loader, num_labels=3)
        torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def test_two_process_evaluation_counts_every_sample_once():
    expected = direct_metric(labelled_items(), LabelReader())
    with tempfile.TemporaryDirectory() as tmp:
        torch.multiprocessing.start_processes(_gloo_evaluate, args=(2, os.path.join(tmp, "init"), tmp), nprocs=2,
                                              start_method="fork")
        for rank in range(2):
            result = torch.load(os.path.join(tmp, f"rank{rank}.pt"), weights_only=False)
            for key in expected:
                np.testing.assert_array_equal(result[key], expected[key])
