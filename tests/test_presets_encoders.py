"""The encoder presets (DINOv2-S after UniMatch V2, ConvNeXt-T) and benchmarks/encoders.py.

The presets must say what they are, use sizes a ViT takes without padding, and build the networks
and the optimizer they describe; the benchmark must run end to end on a tiny setting (one step of
a random-init ResNet-18 and a DINOv2-S at a 28 px crop, each in its own process).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cps_hf.training_args import parse_args
from repo_modules import load

ROOT = Path(__file__).resolve().parents[1]
DINOV2 = sorted((ROOT / "configs").glob("*_dinov2s_*.yaml"))
CONVNEXT = sorted((ROOT / "configs").glob("*_convnext-t_*.yaml"))


def test_encoder_presets_exist_and_parse():
    names = {path.stem for path in DINOV2 + CONVNEXT}
    for count in (92, 183, 366, 732, 1464):
        assert {f"voc_dinov2s_{count}_cps_cutmix", f"voc_dinov2s_{count}_supervised"} <= names
    assert {"city_dinov2s_1-8_cps_cutmix", "city_dinov2s_1-8_supervised",
            "voc_convnext-t_1-8_cps_cutmix", "voc_convnext-t_1-8_supervised"} <= names
    for path in DINOV2:
        args = parse_args(["--config", str(path)])
        assert args.optimizer == "adamw" and args.head_lr_multiplier == 40.0 and args.output_stride is None
        assert "UniMatch V2" in args.preset_note and args.pretrained_backbone == "timm"
        # Training crops and evaluation inputs are multiples of the patch: nothing is padded.
        assert args.crop_size % 14 == 0 and (args.eval_crop_size or args.crop_size) % 14 == 0
        protocol = path.stem.split("_")[2]
        assert args.labeled == f"unimatch/{args.dataset}/{protocol}"
    for path in CONVNEXT:
        args = parse_args(["--config", str(path)])
        assert args.backbone.startswith("convnext_tiny") and args.output_stride == 16 and not args.multi_grid
        assert "ConvNeXt" in args.preset_note


@pytest.mark.parametrize("preset", ["voc_convnext-t_1-8_cps_cutmix", "voc_dinov2s_183_cps_cutmix",
                                    "voc_dinov2s_183_unimatch_v2"])
def test_encoder_preset_builds_its_network_and_optimizer(preset):
    from cps_hf.optim import build_optimizer
    from cps_hf.training import build_networks, model_config_from_args

    args = parse_args(["--config", str(ROOT / "configs" / f"{preset}.yaml"), "--pretrained_backbone", "none",
                       "--aspp_channels", "16", "--decoder_channels", "16"])
    config = model_config_from_args(args, ["background", "thing"])
    (network,) = build_networks(config, 1)
    optimizer = build_optimizer([network], lr=args.learning_rate, weight_decay=args.weight_decay,
                                optimizer=args.optimizer, head_lr_multiplier=args.head_lr_multiplier,
                                layer_decay=args.layer_decay, betas=args.adam_betas)
    rates = {group["name"]: group["lr"] for group in optimizer.param_groups}
    head = rates["model0_head_decay"]
    assert head == pytest.approx(args.learning_rate * args.head_lr_multiplier)
    if args.layer_decay:  # ConvNeXt: the stem ~0.56x (0.97 ** 19), the last stage's last block 0.97x
        assert min(rates.values()) == pytest.approx(args.learning_rate * 0.97 ** 19)
        assert config.backbone_kwargs == {"drop_path_rate": 0.4}
    else:  # DINOv2: one encoder lr, the neck (DeepLabv3+) or the DPT head at x40
        assert rates["model0_backbone_decay"] == args.learning_rate
        assert (network.neck is None) == (args.decode_head == "dpt")


def test_unimatch_presets_follow_their_configs():
    """UniMatch V1 (R101) and V2 (DINOv2-S/B, DPT head) for every split their READMEs report."""
    voc, city = ("92", "183", "366", "732", "1464"), ("1-16", "1-8", "1-4", "1-2")
    for dataset, short, protocols in (("voc", "voc", voc), ("cityscapes", "city", city)):
        for protocol in protocols:
            v1 = parse_args(["--config", str(ROOT / "configs" / f"{short}_r101_{protocol}_unimatch.yaml")])
            assert (v1.method, v1.optimizer, v1.backbone, v1.output_stride, v1.multi_grid) == (
                "unimatch", "sgd", "resnet101s", 16, None)
            assert v1.labeled == f"unimatch/{dataset}/{protocol}" and "Their README (R101)" in v1.preset_note
            expected = (1e-3, 10.0, 321, 0.95, "ce") if dataset == "voc" else (5e-3, 1.0, 801, 0.0, "ohem")
            assert (v1.learning_rate, v1.head_lr_multiplier, v1.crop_size, v1.pseudo_label_threshold,
                    v1.sup_loss) == expected
            for size, encoder in (("s", "vit_small_patch14_dinov2"), ("b", "vit_base_patch14_dinov2")):
                v2 = parse_args(["--config", str(ROOT / "configs" / f"{short}_dinov2{size}_{protocol}_unimatch_v2.yaml")])
                assert (v2.method, v2.decode_head, v2.optimizer, v2.learning_rate, v2.head_lr_multiplier) == (
                    "unimatch_v2", "dpt", "adamw", 5e-6, 40.0)
                assert v2.backbone.startswith(encoder) and v2.crop_size == (518 if dataset == "voc" else 798)
                assert "Expect:" in v2.preset_note


def _benchmark_module():
    return load("benchmarks/encoders.py", "encoders_benchmark")


@pytest.mark.slow
def test_benchmark_runs_on_a_tiny_setting(tmp_path):
    bench = _benchmark_module()
    out = tmp_path / "encoders.json"
    summary = bench.main(["--reference", "resnet18", "--encoders", "vit_small_patch14_dinov2", "--crop", "28",
                          "--batch", "2", "--repeats", "1", "--warmup", "0", "--head_channels", "16",
                          "--output", str(out)])
    assert json.loads(out.read_text())["results"] == summary["results"]
    reference, vit = summary["results"]
    assert reference["encoder"] == "resnet18" and reference["params"]["neck"] == 0
    assert vit["preset"] == "voc_dinov2s_183_cps_cutmix.yaml" and vit["params"]["neck"] > 0
    assert vit["output_stride"] is None and all(r["step_s"] > 0 for r in summary["results"])
    assert "| vit_small_patch14_dinov2 |" in summary["table"] and "| 1.00 |" in summary["table"]


def test_benchmark_refuses_a_batch_of_one():
    with pytest.raises(SystemExit):
        _benchmark_module().parse_args(["--batch", "1"])
