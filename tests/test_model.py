"""The CPS network as a transformers model: architecture, init, save/load, Auto classes, pipeline."""

from functools import partial

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn
from transformers import AutoConfig, AutoImageProcessor, AutoModelForSemanticSegmentation, pipeline

import cps_hf
from cps_hf import CPSConfig, CPSForSemanticSegmentation, CPSImageProcessor

import tiny_models

tiny_config = partial(tiny_models.tiny_config, channels=32)


def test_forward_logits_at_input_size_and_loss_ignores_255():
    model = CPSForSemanticSegmentation(tiny_config()).eval()
    pixels = torch.randn(2, 3, 48, 40)
    labels = torch.randint(0, 3, (2, 48, 40))
    labels[:, :10] = 255
    out = model(pixel_values=pixels, labels=labels)
    assert out.logits.shape == (2, 3, 48, 40)
    expected = nn.functional.cross_entropy(out.logits, labels, ignore_index=255)
    torch.testing.assert_close(out.loss, expected)
    assert model(pixel_values=pixels, return_dict=False)[0].shape == (2, 3, 48, 40)


def test_paper_architecture_matches_the_original():
    """Deep stem 3-64-64-128, multi-grid dilations 2/4/8 at stride 16, ASPP 6/12/18, 48/256 decoder."""
    config = tiny_config(backbone="resnet50s", multi_grid=[1, 2, 4], aspp_channels=256, decoder_channels=256,
                         low_level_channels=48)
    model = CPSForSemanticSegmentation(config)
    stem = [m for m in model.backbone.conv1 if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in stem] == [(3, 64, (3, 3)), (64, 64, (3, 3)),
                                                                             (64, 128, (3, 3))]
    assert [block.conv2.dilation[0] for block in model.backbone.layer4] == [2, 4, 8]
    assert [block.conv2.padding[0] for block in model.backbone.layer4] == [2, 4, 8]
    assert all(block.conv2.stride == (1, 1) for block in model.backbone.layer4)
    assert model.backbone.feature_info.reduction() == [4, 16]
    aspp = model.decode_head.aspp
    assert [b.dilation[0] for b in aspp.branches] == [1, 6, 12, 18]
    assert aspp.branches_norm.num_features == 1024 and aspp.reduce.out_channels == 256
    assert model.decode_head.decoder.low_level[0].out_channels == 48
    assert not any(isinstance(m, nn.Dropout2d) for m in model.modules())
    assert model.decode_head.classifier.bias is not None


def test_output_stride_8_and_backbones_without_dilation():
    model = CPSForSemanticSegmentation(tiny_config(output_stride=8))
    assert model.backbone.feature_info.reduction() == [4, 8]
    with pytest.raises(ValueError, match="output_stride=None"):
        CPSForSemanticSegmentation(tiny_config(backbone="hrnet_w18_small", output_stride=16))
    hrnet = CPSForSemanticSegmentation(tiny_config(backbone="hrnet_w18_small", output_stride=None)).eval()
    assert hrnet(pixel_values=torch.randn(1, 3, 64, 64)).logits.shape == (1, 3, 64, 64)


def test_bad_config_fields_are_named():
    with pytest.raises(Exception, match="output_stride"):
        tiny_config(output_stride=12)
    with pytest.raises(Exception, match="aspp_rates"):
        tiny_config(aspp_rates=[6, 12])
    with pytest.raises(ValueError, match="multi_grid"):
        CPSForSemanticSegmentation(tiny_config(backbone="mobilenetv3_small_100", multi_grid=[1, 2, 4]))


def test_unknown_backbone_names_are_one_line_with_close_names():
    with pytest.raises(ValueError, match=r"^backbone 'resnet5o' is not a timm model; close names: resnet50,") as caught:
        CPSForSemanticSegmentation(tiny_config(backbone="resnet5o"))
    assert "resnet50d" in str(caught.value) and "\n" not in str(caught.value)
    with pytest.raises(ValueError, match=r"timm has no pretrained tag 'in21k' for resnet18; tags: a1_in1k, "):
        CPSForSemanticSegmentation(tiny_config(backbone="resnet18.in21k"))


def test_post_init_keeps_backbone_and_heads_differ_by_seed():
    """transformers' post_init must not touch the timm backbone; head init is kaiming and seed-dependent."""
    torch.manual_seed(0)
    first = CPSForSemanticSegmentation(tiny_config())
    torch.manual_seed(1)
    second = CPSForSemanticSegmentation(tiny_config())
    # timm's ResNet init zero-initialises nothing in BasicBlock bn2 by default, but sets BN weight 1:
    # a transformers-style normal(0.02) re-init of convs would give a tiny std instead of kaiming's.
    conv = first.backbone.layer1[0].conv1.weight
    assert conv.std() > 0.05
    head_conv = first.decode_head.decoder.fuse[0].weight
    fan_in = head_conv[0].numel()
    assert abs(head_conv.std().item() - (2.0 / fan_in) ** 0.5) < 0.2 * (2.0 / fan_in) ** 0.5
    assert not torch.equal(first.decode_head.classifier.weight, second.decode_head.classifier.weight)


def test_save_load_round_trip_with_auto_classes(tmp_path):
    model = CPSForSemanticSegmentation(tiny_config()).eval()
    # Make BN statistics non-trivial so that losing them on load would show.
    model.train()
    with torch.no_grad():
        model(pixel_values=torch.randn(4, 3, 32, 32) * 3 + 1)
    model.eval()
    model.save_pretrained(tmp_path)
    CPSImageProcessor().save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors",
                                                          "preprocessor_config.json"]
    assert isinstance(AutoConfig.from_pretrained(tmp_path), CPSConfig)
    assert isinstance(AutoImageProcessor.from_pretrained(tmp_path), CPSImageProcessor)
    loaded = AutoModelForSemanticSegmentation.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, CPSForSemanticSegmentation)
    for (name, saved), (_, reloaded) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(saved, reloaded), name
    pixels = torch.randn(2, 3, 40, 56)
    with torch.no_grad():  # equal weights; memory alignment of mmapped tensors can change the last float bits
        torch.testing.assert_close(loaded(pixel_values=pixels).logits, model(pixel_values=pixels).logits,
                                   rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loaded.backbone.bn1.running_var, model.backbone.bn1.running_var, rtol=0, atol=0)


def test_pipeline_returns_masks_at_image_size(tmp_path):
    model = CPSForSemanticSegmentation(tiny_config()).eval()
    with torch.no_grad():  # bias the classifier so that "dog" wins everywhere: the answer is then known
        model.decode_head.classifier.bias.copy_(torch.tensor([0.0, 0.0, 50.0]))
    model.save_pretrained(tmp_path)
    CPSImageProcessor().save_pretrained(tmp_path)
    segmenter = pipeline("image-segmentation", model=str(tmp_path), subtask="semantic")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (37, 53, 3), dtype=np.uint8))
    results = segmenter(image)
    assert [r["label"] for r in results] == ["dog"]
    mask = results[0]["mask"]
    assert mask.size == image.size and mask.mode == "L"
    assert np.asarray(mask).min() == 255


def test_image_processor_normalises_at_native_size():
    processor = CPSImageProcessor()
    image = Image.fromarray(np.full((20, 30, 3), 255, dtype=np.uint8))
    pixels = processor(image, return_tensors="pt")["pixel_values"]
    assert pixels.shape == (1, 3, 20, 30)
    expected = (1.0 - torch.tensor([0.485, 0.456, 0.406])) / torch.tensor([0.229, 0.224, 0.225])
    torch.testing.assert_close(pixels[0, :, 0, 0], expected)
    assert cps_hf.__version__
