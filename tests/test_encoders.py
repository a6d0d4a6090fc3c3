"""Encoders beyond ResNet: ConvNeXt (features_only at stride 4 and 16) and plain ViTs (DINOv2 and other timm
ViTs, through `forward_intermediates` and a neck), plus the training helpers every encoder shares
(gradient checkpointing, a frozen backbone, parameter counts) and the batch-1 ASPP error.

Tiny random-init models on the CPU; every image size is odd on purpose (70x51: not a multiple of 14 or 16).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from torch import nn
from transformers import AutoModelForSemanticSegmentation, pipeline

import cps_hf  # noqa: F401  (registers the CPS Auto classes)
from cps_hf import CPSConfig, CPSForSemanticSegmentation, CPSImageProcessor
from cps_hf.hub import export_model
from cps_hf.modeling_cps import vit_tap_indices
from cps_hf.training import build_networks, freeze_unreachable_parameters
from cps_hf.weights import check_checkpoint_matches, init_networks_from, load_backbone_weights

import tiny_models
from tiny_models import LABELS, logits_of, with_running_statistics

TINY_VIT = dict(depth=4, embed_dim=48, num_heads=2, img_size=56)  # DINOv2 layout, 4x4 position grid
HEIGHT, WIDTH = 70, 51
CARD = dict(dataset_name="toy", dataset_type="folder", protocol=None, method="CPS")


def tiny_config(backbone: str = "vit_small_patch14_dinov2", **overrides) -> CPSConfig:
    """A tiny DINOv2-layout ViT by default (TINY_VIT); a CNN name gives a tiny head on that CNN."""
    overrides.setdefault("backbone_kwargs", dict(TINY_VIT) if "vit_" in backbone else None)
    return tiny_models.tiny_config(LABELS, backbone, **overrides)


def tiny_model(backbone: str = "vit_small_patch14_dinov2", seed: int = 0, **overrides) -> CPSForSemanticSegmentation:
    torch.manual_seed(seed)
    return CPSForSemanticSegmentation(tiny_config(backbone, **overrides))


def image_batch(batch: int = 2, height: int = HEIGHT, width: int = WIDTH, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------------------------------------
# Building: which path, which taps, which parameters
# ---------------------------------------------------------------------------------------------


def test_a_plain_vit_is_detected_built_whole_and_pruned_after_its_last_tap():
    model = tiny_model(vit_feature_indices=[0, -3])  # blocks 0 and 1 of 4: blocks 2 and 3 are removed
    assert isinstance(model.backbone, timm.models.VisionTransformer)  # not a features_only wrapper
    assert model.vit_taps == [0, 1] and len(model.backbone.blocks) == 2 and model.patch_size == (14, 14)
    assert model.backbone.dynamic_img_size and isinstance(model.backbone.head, nn.Identity)
    keys = list(model.state_dict())
    assert {key.split(".")[0] for key in keys} == {"backbone", "neck", "decode_head"}
    assert not any(key.startswith("backbone.blocks.2.") for key in keys)
    assert "backbone.norm.weight" in keys  # the taps are normed by the ViT's own final norm
    # Every parameter reaches the logits (DDP needs that); at 64x64 the model pads to 70x70.
    assert freeze_unreachable_parameters(model) == []


def test_default_taps_are_four_evenly_spaced_blocks_ending_at_the_last():
    config = tiny_config()
    assert vit_tap_indices(config, 12) == [2, 5, 8, 11]
    assert vit_tap_indices(config, 24) == [5, 11, 17, 23]
    assert vit_tap_indices(config, 4) == [0, 1, 2, 3] and vit_tap_indices(config, 2) == [0, 1]
    assert tiny_model().vit_taps == [0, 1, 2, 3]


def test_vit_and_cnn_fields_are_refused_where_they_do_not_apply():
    with pytest.raises(ValueError, match=r"vit_feature_indices .*\[4\] out of range .* 4 blocks"):
        tiny_model(vit_feature_indices=[1, 4])
    with pytest.raises(Exception, match="vit_feature_indices must be distinct"):  # transformers' validation error
        tiny_config(vit_feature_indices=[1, 1])
    with pytest.raises(ValueError, match=r"output_stride=8: backbone 'vit_small_patch14_dinov2' is a plain ViT"):
        tiny_model(output_stride=8)
    with pytest.raises(ValueError, match="backbone_out_indices: .*vit_feature_indices"):
        tiny_model(backbone_out_indices=[0, 1])
    with pytest.raises(ValueError, match="vit_feature_indices is for plain ViT backbones; 'convnext_atto'"):
        tiny_model("convnext_atto", vit_feature_indices=[0])


def test_convnext_taps_stride_4_and_16():
    model = tiny_model("convnext_atto")
    assert model.neck is None
    assert model.backbone.feature_info.reduction() == [4, 16]
    assert model.backbone.feature_info.channels() == [40, 320]


def test_the_resnet_state_dict_is_unchanged():
    """The ResNet path gets no neck: same keys, in the same order, as before ViTs were added."""
    model = tiny_model("resnet18")
    assert model.neck is None and model.vit_taps is None
    keys = list(model.state_dict())
    assert not any(key.startswith("neck.") for key in keys)
    assert len(keys) == 162
    # sha256 of the key list of this config, computed with the code before the ViT path existed.
    assert hashlib.sha256("\n".join(keys).encode()).hexdigest() == RESNET18_KEYS_SHA256


RESNET18_KEYS_SHA256 = "1cd543a248254c3d086e79842189b8f704f2f4b5edfc845fd6df6a438008683d"


@pytest.mark.parametrize("backbone", ["vit_small_patch14_dinov2", "vit_small_patch16_224", "convnext_atto"])
def test_forward_on_an_odd_size_gives_logits_at_that_size(backbone):
    model = tiny_model(backbone).eval()
    pixel_values = image_batch()
    labels = torch.randint(0, 3, (2, HEIGHT, WIDTH))
    output = model(pixel_values=pixel_values, labels=labels)
    assert output.logits.shape == (2, 3, HEIGHT, WIDTH)
    torch.testing.assert_close(output.loss, nn.functional.cross_entropy(output.logits, labels, ignore_index=255))


def test_the_input_is_padded_right_and_bottom_and_the_logits_cropped():
    """70x51 with patch 14 runs as 70x56: the logits are the padded image's, cropped, pixel for pixel."""
    model = with_running_statistics(tiny_model())
    pixel_values = image_batch()
    padded = nn.functional.pad(pixel_values, (0, 56 - WIDTH, 0, 0))
    torch.testing.assert_close(logits_of(model, pixel_values), logits_of(model, padded)[..., :HEIGHT, :WIDTH],
                               rtol=1e-5, atol=1e-5)


def test_without_padding_other_sizes_are_refused_by_name():
    model = tiny_model(pad_to_patch_multiple=False).eval()
    with pytest.raises(ValueError, match=r"input size 70x51 is not a multiple of the patch size 14x14 .*"
                                         r"pad_to_patch_multiple=True"):
        model(pixel_values=image_batch())
    assert model(pixel_values=image_batch(width=56)).logits.shape == (2, 3, HEIGHT, 56)


# ---------------------------------------------------------------------------------------------
# CPS's two networks: shared backbone init, their own neck and head
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backbone", ["vit_small_patch14_dinov2", "convnext_atto"])
def test_cps_networks_share_the_backbone_and_differ_in_neck_and_head(backbone):
    first, second = build_networks(tiny_config(backbone), 2, seed=0)
    ours, theirs = first.state_dict(), second.state_dict()
    assert all(torch.equal(ours[key], theirs[key]) for key in ours if key.startswith("backbone."))
    own_init = [key for key in ours if key.startswith(("neck.", "decode_head.")) and key.endswith("weight")
                and ours[key].dim() == 4]
    assert own_init and all(not torch.equal(ours[key], theirs[key]) for key in own_init)
    # Building network 1 again with the same seed gives the same network: the init is reproducible.
    again = build_networks(tiny_config(backbone), 1, seed=0)[0].state_dict()
    assert all(torch.equal(ours[key], again[key]) for key in ours)


def test_the_neck_is_initialised_as_head_layers():
    """Kaiming (relu) over the inputs that reach an output pixel; torch's defaults would be 3-4x smaller."""
    neck = tiny_model().neck
    upsample = neck.upsample[0]  # ConvTranspose2d 48 -> 24, kernel 2, stride 2: each output sees 48 inputs
    assert isinstance(upsample, nn.ConvTranspose2d)
    expected = (2.0 / upsample.in_channels) ** 0.5
    assert abs(upsample.weight.std().item() - expected) < 0.15 * expected
    fuse = neck.fuse[0]  # Conv2d 4x48 -> 48, 1x1: kaiming fan_in like the decode head
    expected = (2.0 / fuse.in_channels) ** 0.5
    assert abs(fuse.weight.std().item() - expected) < 0.15 * expected


# ---------------------------------------------------------------------------------------------
# Export, reload, pipeline, remote code
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def vit_model() -> CPSForSemanticSegmentation:
    model = tiny_model("vit_small_patch14_dinov2.lvd142m")  # a pretrained tag, as a real run records
    model.config.backbone_pretrained_source = "timm/vit_small_patch14_dinov2.lvd142m"
    return with_running_statistics(model)


@pytest.fixture(scope="module")
def vit_export(vit_model, tmp_path_factory):
    return export_model(vit_model, tmp_path_factory.mktemp("export") / "cps-vit", **CARD)


def test_a_vit_export_reloads_without_downloading_to_the_same_logits(vit_model, vit_export, monkeypatch):
    import timm.models._builder as timm_builder

    def refuse(*args, **kwargs):
        raise AssertionError("from_pretrained tried to fetch backbone weights")

    monkeypatch.setattr(timm_builder, "load_pretrained", refuse)
    loaded = AutoModelForSemanticSegmentation.from_pretrained(vit_export).eval()
    assert isinstance(loaded, CPSForSemanticSegmentation) and loaded.neck is not None
    pixel_values = image_batch()
    torch.testing.assert_close(logits_of(loaded, pixel_values), logits_of(vit_model, pixel_values),
                               rtol=1e-5, atol=1e-5)
    card = (vit_export / "README.md").read_text()
    assert "| Backbone weights licence | Apache-2.0 (DINOv2 weights, Meta) |" in card
    assert "| Output stride | 14 (the patch size" in card and "normed outputs of blocks 0, 1, 2, 3" in card


def test_the_pipeline_on_a_vit_export_returns_masks_at_the_image_size(vit_model, vit_export):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (WIDTH, HEIGHT, 3), dtype=np.uint8))
    assert image.size == (HEIGHT, WIDTH)  # 70 wide, 51 high
    segments = pipeline("image-segmentation", model=str(vit_export), subtask="semantic")(image)
    assert segments and all(segment["mask"].size == image.size for segment in segments)
    expected = logits_of(vit_model, CPSImageProcessor()(image, return_tensors="pt")["pixel_values"]).argmax(1)[0]
    predicted = np.full(expected.shape, -1)
    for segment in segments:
        predicted[np.array(segment["mask"]) > 0] = LABELS.index(segment["label"])
    assert np.array_equal(predicted, expected.numpy())


REMOTE_LOAD = """
import sys, torch
from transformers import AutoModelForSemanticSegmentation
model = AutoModelForSemanticSegmentation.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
with torch.no_grad():
    logits = model(pixel_values=torch.load(sys.argv[2])).logits
torch.save(logits, sys.argv[3])
print(type(model).__module__, "cps_hf" in sys.modules)
"""


def test_a_vit_export_loads_as_remote_code_without_cps_hf(vit_model, vit_export, tmp_path):
    torch.save(image_batch(), tmp_path / "pixels.pt")
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    completed = subprocess.run([sys.executable, "-c", REMOTE_LOAD, str(vit_export), str(tmp_path / "pixels.pt"),
                                str(tmp_path / "logits.pt")], capture_output=True, text=True, timeout=300, env=env,
                               cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr[-3000:]
    module, imported_cps_hf = completed.stdout.split()[-2:]
    assert module.startswith("transformers_modules.") and imported_cps_hf == "False"
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), logits_of(vit_model, image_batch()),
                               rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Weights from outside: timm checkpoints, cps_hf models, checkpoints of a run
# ---------------------------------------------------------------------------------------------


def test_a_timm_vit_checkpoint_loads_into_the_pruned_backbone(tmp_path):
    timm_vit = timm.create_model("vit_small_patch14_dinov2", num_classes=5, **TINY_VIT)  # a classifier, 4 blocks
    with torch.no_grad():
        for tensor in timm_vit.state_dict().values():
            tensor.uniform_(0.5, 1.5)
    torch.save(timm_vit.state_dict(), tmp_path / "vit.pth")
    model = tiny_model(vit_feature_indices=[1])  # blocks 0-1 kept: blocks 2-3 and the classifier are unused
    report = load_backbone_weights(model, tmp_path / "vit.pth")
    assert report.loaded == report.total and not report.kept_random
    theirs = timm_vit.state_dict()
    for key, tensor in model.backbone.state_dict().items():
        assert torch.equal(tensor, theirs[key]), key
    assert model.config.backbone_pretrained_source == "vit.pth"


def test_init_from_and_checkpoint_checks_cover_the_neck(vit_model, vit_export):
    networks = build_networks(tiny_config("vit_small_patch14_dinov2.lvd142m"), 2, seed=3, init_from=str(vit_export))
    exported, second = vit_model.state_dict(), networks[1].state_dict()
    assert all(torch.equal(networks[0].state_dict()[key], exported[key]) for key in exported)
    assert all(torch.equal(second[key], exported[key]) for key in exported if key.startswith("backbone."))
    assert not torch.equal(second["neck.fuse.0.weight"], exported["neck.fuse.0.weight"])  # its own seeded neck
    other_taps = build_networks(tiny_config(vit_feature_indices=[1, 3]), 1)
    with pytest.raises(ValueError, match=r"its vit_feature_indices is None, this run's is \[1, 3\]"):
        init_networks_from(other_taps, str(vit_export))


def test_check_checkpoint_matches_refuses_a_neck_of_other_taps(tmp_path):
    from safetensors.torch import save_file

    saved = tiny_model(vit_feature_indices=[1, 3])
    save_file(saved.state_dict(), tmp_path / "model.safetensors")
    check_checkpoint_matches(tmp_path, [tiny_model(vit_feature_indices=[1, 3])])
    # Taps [1]: blocks 2 and 3 are pruned away and the neck fuses one map, not two.
    with pytest.raises(ValueError, match=r"does not fit this run's network: .*tensors this run lacks \(e.g. "
                                         r"'backbone.blocks.2."):
        check_checkpoint_matches(tmp_path, [tiny_model(vit_feature_indices=[1])])


# ---------------------------------------------------------------------------------------------
# Training helpers: batch-1 ASPP error, gradient checkpointing, a frozen backbone, parameter counts
# ---------------------------------------------------------------------------------------------


def test_one_image_in_training_is_a_clear_error_from_the_aspp_pooling_norm():
    model = tiny_model("resnet18").train()
    with pytest.raises(ValueError, match=r"image-pooling BatchNorm needs at least 2 images per device .*"
                                         r"per_device_train_batch_size >= 2, or SyncBatchNorm"):
        model(pixel_values=torch.randn(1, 3, 64, 64))
    assert model(pixel_values=torch.randn(2, 3, 64, 64)).logits.shape == (2, 3, 64, 64)
    assert model.eval()(pixel_values=torch.randn(1, 3, 64, 64)).logits.shape == (1, 3, 64, 64)
    aspp = model.train().decode_head.aspp  # SyncBatchNorm averages the pooled maps over processes: allowed
    aspp.pool_norm = nn.SyncBatchNorm(aspp.pool_norm.num_features)
    aspp._check_pool_batch(torch.zeros(1, 512, 4, 4))


def one_training_step(model, pixel_values, labels):
    model.zero_grad(set_to_none=True)
    model(pixel_values=pixel_values, labels=labels).loss.backward()
    return {name: parameter.grad for name, parameter in model.named_parameters() if parameter.grad is not None}


@pytest.mark.parametrize("backbone", ["vit_small_patch14_dinov2", "resnet10t", "resnet10t+syncbn"])
def test_backbone_gradient_checkpointing_gives_the_same_gradients_and_statistics(backbone):
    backbone, _, sync = backbone.partition("+")
    plain, checkpointed = tiny_model(backbone).train(), tiny_model(backbone).train()
    checkpointed.set_backbone_gradient_checkpointing(True)
    if sync:  # converted after enabling, as a trainer may do (new modules; single process: plain BN maths)
        checkpointed = timm.layers.convert_sync_batchnorm(checkpointed)
    block = checkpointed.backbone.blocks[1] if backbone.startswith("vit") else checkpointed.backbone.layer2
    calls = []
    block.register_forward_hook(lambda *args: calls.append(1))
    pixel_values, labels = image_batch(height=56, width=42), torch.randint(0, 3, (2, 56, 42))
    expected = one_training_step(plain, pixel_values, labels)
    gradients = one_training_step(checkpointed, pixel_values, labels)
    assert len(calls) == 2  # run once forward, once more in backward: checkpointing is on
    assert gradients.keys() == expected.keys() and len(expected) == len(list(plain.parameters()))
    for name in expected:
        torch.testing.assert_close(gradients[name], expected[name], rtol=1e-5, atol=1e-6, msg=name)
    # BN running statistics move once per forward, not again when a stage is recomputed.
    for (name, ours), (_, theirs) in zip(checkpointed.named_buffers(), plain.named_buffers()):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7, msg=name)

    checkpointed.set_backbone_gradient_checkpointing(False)
    calls.clear()
    one_training_step(checkpointed, pixel_values, labels)
    assert len(calls) == 1


def test_gradient_checkpointing_is_refused_by_name_where_timm_has_none():
    model = tiny_model("hrnet_w18_small", output_stride=None)
    with pytest.raises(ValueError, match="backbone 'hrnet_w18_small' does not support gradient checkpointing"):
        model.set_backbone_gradient_checkpointing(True)


@pytest.mark.parametrize("backbone", ["resnet10t", "vit_small_patch14_dinov2"])
def test_a_frozen_backbone_keeps_its_weights_and_statistics_through_a_train_step(backbone):
    model = tiny_model(backbone)
    model.freeze_backbone()
    model.train()
    assert not model.backbone.training and model.decode_head.training
    before = {key: value.clone() for key, value in model.state_dict().items()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    one_training_step(model, image_batch(height=56, width=42), torch.randint(0, 3, (2, 56, 42)))
    optimizer.step()
    after = model.state_dict()
    changed = {key for key in before if not torch.equal(before[key], after[key])}
    assert changed and not any(key.startswith("backbone.") for key in changed)
    assert any(key.endswith("running_mean") for key in changed)  # the head's BN did train
    counts = model.parameter_counts()
    assert counts["trainable"] == counts["head"] and counts["total"] == counts["backbone"] + counts["head"]
    model.freeze_backbone(False)
    model.train()
    assert model.backbone.training and model.parameter_counts()["trainable"] == counts["total"]
