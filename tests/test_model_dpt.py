"""The DPT head (UniMatch V2's decoder for plain ViTs) and V2's complementary channel dropout.

Tiny random-init DINOv2-layout ViTs on the CPU (tests/test_encoders.py's), odd image sizes on purpose.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from huggingface_hub.errors import StrictDataclassClassValidationError
from transformers import AutoModelForSemanticSegmentation

import cps_hf  # noqa: F401  (registers the CPS Auto classes)
from cps_hf import CPSConfig
from cps_hf.hub import export_model
from cps_hf.modeling_cps import CPSDPTHead, _complementary_dropout

from test_encoders import CARD, image_batch, tiny_model
from tiny_models import logits_of


def dpt_model(seed: int = 0, **overrides):
    return tiny_model(decode_head="dpt", seed=seed, **overrides)


def test_the_dpt_head_replaces_the_neck_and_gives_logits_at_the_input_size():
    model = dpt_model()
    assert model.neck is None and isinstance(model.decode_head, CPSDPTHead)
    assert not any(key.startswith("neck.") for key in model.state_dict())
    logits = model(pixel_values=image_batch()).logits
    assert logits.shape == (2, 3, 70, 51)
    logits.square().mean().backward()
    assert [name for name, p in model.named_parameters() if p.grad is None] == []  # no unused layer (DDP)


def test_the_levels_are_4x_2x_1x_and_half_the_patch_grid_and_the_logits_8x():
    model = dpt_model().eval()
    sizes = []
    hooks = [level.register_forward_hook(lambda module, args, out: sizes.append(tuple(out.shape[-2:])))
             for level in model.decode_head.levels]
    classifier_size = []
    hooks.append(model.decode_head.classifier.register_forward_hook(
        lambda module, args, out: classifier_size.append(tuple(out.shape[-2:]))))
    logits_of(model, image_batch(height=70, width=56))  # 5 x 4 patches of 14
    for hook in hooks:
        hook.remove()
    assert sizes == [(20, 16), (10, 8), (5, 4), (3, 2)]
    assert classifier_size == [(40, 32)]


def test_default_widths_follow_unimatch_v2_and_can_be_set():
    head = dpt_model().decode_head  # width 48: channels w/8 .. w, features a sixth of the width
    assert [conv.out_channels for conv in head.projections] == [6, 12, 24, 48]
    assert head.levels[0].out_channels == 8
    head = dpt_model(dpt_channels=[4, 8, 16, 32], dpt_features=10).decode_head
    assert [conv.out_channels for conv in head.projections] == [4, 8, 16, 32]
    assert head.classifier.in_channels == 10


def test_dpt_is_refused_by_name_where_it_does_not_apply():
    with pytest.raises(ValueError, match="needs a plain ViT backbone"):
        tiny_model("resnet18", decode_head="dpt")
    with pytest.raises(ValueError, match="taps four blocks"):
        dpt_model(vit_feature_indices=[1, 3])
    with pytest.raises(StrictDataclassClassValidationError, match="decode_head must be one of"):
        CPSConfig(decode_head="upernet")
    with pytest.raises(StrictDataclassClassValidationError, match="dpt_channels needs four"):
        CPSConfig(dpt_channels=[8, 8])


def test_networks_with_other_seeds_get_other_dpt_heads():
    first, second = dpt_model(seed=0).state_dict(), dpt_model(seed=1).state_dict()
    assert not torch.equal(first["decode_head.classifier.weight"], second["decode_head.classifier.weight"])


def test_a_dpt_export_reloads_to_the_same_logits(tmp_path):
    model = dpt_model().eval()
    exported = export_model(model, tmp_path / "cps-dpt", **CARD)
    loaded = AutoModelForSemanticSegmentation.from_pretrained(exported).eval()
    assert loaded.config.decode_head == "dpt" and loaded.neck is None
    torch.testing.assert_close(logits_of(loaded, image_batch()), logits_of(model, image_batch()),
                               rtol=1e-5, atol=1e-5)
    assert "DPT head (UniMatch V2's)" in (exported / "README.md").read_text()


# ---------------------------------------------------------------------------------------------
# Complementary channel dropout
# ---------------------------------------------------------------------------------------------


def test_complementary_masks_zero_in_one_view_what_they_double_in_the_other():
    ones = torch.ones(8, 6, 3, 2)
    (masked,) = _complementary_dropout((ones,), 0.5, seed=7)
    first, second = masked.chunk(2)
    assert set(masked.unique().tolist()) <= {0.0, 1.0, 2.0}
    torch.testing.assert_close(first + second, torch.full_like(first, 2.0))  # the complement
    untouched = (first == 1).all(dim=(1, 2, 3))
    assert int(untouched.sum()) == 2  # 1 - 0.5 of the 4 pairs
    assert ((first == 0) | (first == 2))[~untouched].all()  # the others: every channel dropped or doubled
    assert (masked[:, :, 0, 0, None, None] == masked).all()  # one value per channel
    again = _complementary_dropout((ones,), 0.5, seed=7)[0]
    assert torch.equal(again, masked) and not torch.equal(_complementary_dropout((ones,), 0.5, seed=8)[0], masked)


def test_shared_masks_are_one_mask_for_every_map_and_odd_batches_are_refused():
    maps = (torch.ones(4, 5, 2, 2), torch.ones(4, 5, 3, 3))
    shared = _complementary_dropout(maps, 0.5, seed=1, shared=True)
    assert torch.equal(shared[0][:, :, 0, 0], shared[1][:, :, 0, 0])
    with pytest.raises(ValueError, match="even batch"):
        _complementary_dropout((torch.ones(3, 5, 2, 2),), 0.5, seed=1)


def test_the_model_applies_complementary_dropout_to_the_taps_before_the_dpt_head():
    model = dpt_model().eval()
    pixels = torch.cat([image_batch(height=56, width=42)] * 2)
    with torch.no_grad():
        taps = model.backbone.forward_intermediates(pixels, indices=model.vit_taps, norm=True,
                                                    intermediates_only=True, output_fmt="NCHW")
        expected = model.decode_head(*_complementary_dropout(taps, 0.5, seed=5, shared=True))
        expected = F.interpolate(expected, size=(56, 42), mode="bilinear", align_corners=True)
        logits = model(pixel_values=pixels, complementary_dropout=0.5, perturbation_seed=5).logits
    torch.testing.assert_close(logits, expected)
    assert not torch.allclose(logits, logits_of(model, pixels))


def test_a_cnn_masks_each_head_input_and_two_perturbations_at_once_are_refused():
    model = tiny_model("resnet18").eval()
    pixels = torch.cat([image_batch(height=64, width=48)] * 2)
    with torch.no_grad():
        low, high = model.backbone(pixels)
        expected = model.decode_head(*_complementary_dropout((low, high), 0.5, seed=2))
        expected = F.interpolate(expected, size=(64, 48), mode="bilinear", align_corners=True)
        logits = model(pixel_values=pixels, complementary_dropout=0.5, perturbation_seed=2).logits
    torch.testing.assert_close(logits, expected)
    with pytest.raises(ValueError, match="pass one of them"):
        model(pixel_values=pixels, complementary_dropout=0.5, feature_perturbation=0.5)
