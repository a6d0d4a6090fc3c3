"""Every training method on a ConvNeXt and on a plain-ViT encoder, end to end through train_cps.

The model-level tests (tests/test_encoders.py) cover building, padding, export and the pipeline;
this file checks that the trainer and each method's step work with those encoders: 2 steps,
finite losses, evaluation, and an exported model of the right architecture that serves the
pipeline at an odd image size.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from PIL import Image
from transformers import pipeline

from cps_hf.methods import METHOD_NAMES
from cps_hf.modeling_cps import CPSForSemanticSegmentation
from test_train import _read_log, demo_root, fresh_accelerate_state, tiny_args, train_cps  # noqa: F401

ENCODERS = {
    "convnext": ["--backbone", "convnext_atto", "--multi_grid", "none"],
    "vit": ["--backbone", "vit_small_patch14_dinov2", "--output_stride", "none",
            "--backbone_kwargs", '{"depth": 2, "embed_dim": 48, "num_heads": 2, "img_size": 28}'],
}


@pytest.mark.parametrize("encoder", sorted(ENCODERS))
def test_every_method_trains_and_exports_on_the_encoder(demo_root, tmp_path, encoder):
    for method in METHOD_NAMES:
        out = tmp_path / method
        extra = ["--num_networks", "3"] if method.startswith("ncps") else []
        results = train_cps.main(tiny_args(demo_root, out, "--method", method, "--max_train_steps", "2",
                                           "--max_eval_samples", "2", *ENCODERS[encoder], *extra))
        assert results["final_step"] == 2, method
        losses = [record["loss"] for record in _read_log(out) if "loss" in record]
        assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses), (method, losses)
        assert 0.0 <= results["eval_mean_iou"] <= 1.0, method
        config = json.loads((out / "model" / "config.json").read_text())
        assert config["backbone"] == ENCODERS[encoder][1], method

    # The last export (any method's export is the same model class) serves the pipeline at 70x51.
    model = CPSForSemanticSegmentation.from_pretrained(out / "model")
    assert (model.neck is not None) == (encoder == "vit")
    segmenter = pipeline("image-segmentation", model=str(out / "model"))
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (51, 70, 3), dtype=np.uint8))
    masks = segmenter(image)
    assert masks and all(entry["mask"].size == (70, 51) for entry in masks)


DPT_VIT = ["--backbone", "vit_small_patch14_dinov2", "--output_stride", "none", "--decode_head", "dpt",
           "--backbone_kwargs", '{"depth": 4, "embed_dim": 48, "num_heads": 2, "img_size": 28}']


@pytest.mark.parametrize("method", ["unimatch_v2", "unimatch", "fixmatch", "cps_strong", "cps_cutmix"])
def test_the_dpt_head_trains_evaluates_and_serves_the_pipeline(demo_root, tmp_path, method):
    """UniMatch V2's recipe (its DPT head on a DINOv2-layout ViT), and the other weak-to-strong methods and CPS on it."""
    out = tmp_path / method
    results = train_cps.main(tiny_args(demo_root, out, "--method", method, "--max_train_steps", "2",
                                       "--max_eval_samples", "2", *DPT_VIT))
    assert results["final_step"] == 2 and 0.0 <= results["eval_mean_iou"] <= 1.0
    losses = [record["loss"] for record in _read_log(out) if "loss" in record]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["decode_head"] == "dpt"
    model = CPSForSemanticSegmentation.from_pretrained(out / "model")
    assert model.neck is None and type(model.decode_head).__name__ == "CPSDPTHead"
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (51, 70, 3), dtype=np.uint8))
    masks = pipeline("image-segmentation", model=str(out / "model"))(image)
    assert masks and all(entry["mask"].size == (70, 51) for entry in masks)
