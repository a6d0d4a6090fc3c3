#!/usr/bin/env python
"""Writes the paper presets in configs/ from the small tables below (timm-style data-only variants).

    python configs/generate_presets.py          # rewrite the YAML files
    python configs/generate_presets.py --check  # exit 1 if a file differs (the tests run this)

Numbers come from ../shared/notes/official-cps-facts.md ("effective" values of the original
code: its printed lr 0.01/0.02 is divided by the world size twice, which with a standard DDP mean
gradient equals lr 0.0025 and weight decay 4e-4 VOC / 8e-4 Cityscapes) and from the paper.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
FRACTIONS = {"1-16": "1/16", "1-8": "1/8", "1-4": "1/4", "1-2": "1/2"}

# Epochs over the unlabeled set per protocol, chosen by the original so iterations stay ~equal.
VOC_EPOCHS = {"1-16": 32, "1-8": 34, "1-4": 40, "1-2": 60}  # ~39.7k iterations at global batch 8
CITY_EPOCHS = {"1-16": 128, "1-8": 137, "1-4": 160, "1-2": 240}  # ~44.5k iterations
BACKBONES = {"r50": "resnet50s", "r101": "resnet101s"}  # deep-stem "v1c" ResNets, as the original

COMMON = dict(
    pretrained_backbone="timm",
    output_stride=16,
    multi_grid=[1, 2, 4],
    aspp_rates=[6, 12, 18],
    global_batch_size=8,
    momentum=0.9,
    lr_power=0.9,
    learning_rate=0.0025,
    eval_mode="whole",
    checkpointing_steps=2000,
    checkpoints_total_limit=2,
    eval_steps=4000,
    logging_steps=20,
)

VOC = dict(
    dataset="voc", data_root="data/VOCdevkit", train_split="train_aug", val_split="val", crop_size=512,
    scales=[0.5, 0.75, 1.0, 1.5, 1.75, 2.0], sup_loss="ce", weight_decay=4e-4,
)
CITY = dict(
    dataset="cityscapes", data_root="data/cityscapes", train_split="train", val_split="val", crop_size=800,
    scales=[0.5, 0.75, 1.0, 1.5, 1.75, 2.0], sup_loss="ohem", ohem_threshold=0.7, ohem_min_kept=50000,
    ohem_images_per_group=1, weight_decay=8e-4, eval_mode="slide", eval_crop_size=800, eval_stride=534,
)
LAMBDA = {("voc", "cps"): 1.5, ("voc", "cps_cutmix"): 1.0, ("cityscapes", "cps"): 6.0, ("cityscapes", "cps_cutmix"): 5.0}
PAPER_MIOU = {  # Table 1 / 2 / 3 / 5, for the preset note: what a run should land near
    ("voc", "r50", "cps"): [68.21, 73.20, 74.24, 75.91], ("voc", "r50", "cps_cutmix"): [71.98, 73.67, 74.90, 76.15],
    ("voc", "r101", "cps"): [72.18, 75.83, 77.55, 78.64], ("voc", "r101", "cps_cutmix"): [74.48, 76.44, 77.68, 78.64],
    ("cityscapes", "r50", "cps"): [69.79, 74.39, 76.85, 78.64],
    ("cityscapes", "r50", "cps_cutmix"): [74.47, 76.61, 77.83, 78.77],
    ("cityscapes", "r101", "cps"): [70.50, 75.71, 77.41, 80.08],
    ("cityscapes", "r101", "cps_cutmix"): [74.72, 77.62, 79.21, 80.21],
    ("cityscapes", "hrnet", "cps"): [72.49, 76.32, 78.27, 80.02],
    ("cityscapes", "hrnet", "cps_cutmix"): [75.09, 77.92, 79.24, 80.67],
}


def preset(dataset: str, arch: str, protocol: str, method: str) -> tuple[str, dict]:
    base = VOC if dataset == "voc" else CITY
    epochs = (VOC_EPOCHS if dataset == "voc" else CITY_EPOCHS)[protocol]
    index = list(FRACTIONS).index(protocol)
    paper = PAPER_MIOU[(dataset, arch, method)][index]
    short = "voc" if dataset == "voc" else "city"
    config = {**COMMON, **base}
    if arch == "hrnet":
        config.update(backbone="hrnet_w48", output_stride=None, multi_grid=None)
        arch_note = ("HRNet-W48 (paper Table 3). Approximation: the DeepLabv3+ head sits on timm's HRNet-W48 "
                     "features; the paper does not describe its HRNet head.")
    else:
        config["backbone"] = BACKBONES[arch]
        arch_note = f"DeepLabv3+ {arch.upper()} (deep stem, OS16, multi-grid 1/2/4)."
    config.update(
        labeled=f"cps/{dataset}/{protocol}",
        method=method,
        cps_weight=LAMBDA[(dataset, method)],
        num_train_epochs=epochs,
        output_dir=f"outputs/{short}_{arch}_{protocol}_{method}",
    )
    config["preset_note"] = (
        f"{arch_note} {FRACTIONS[protocol]} labels ({dataset}, CPS partition). Hyper-parameters: the original "
        f"code's effective values (lr 0.0025, wd {base['weight_decay']}, global batch 8+8, lambda "
        f"{LAMBDA[(dataset, method)]}); the paper states lr {'0.01' if dataset == 'voc' else '0.04'}, wd 5e-4. "
        f"Budget: {epochs} epochs over the unlabeled set. Paper mIoU: {paper}."
    )
    return f"{short}_{arch}_{protocol}_{method}.yaml", config


def few_supervision(count: int, protocol: str) -> tuple[str, dict]:
    paper = {92: 64.07, 183: 67.42, 366: 71.71, 732: 75.88}[count]
    config = {**COMMON, **VOC, "backbone": "resnet101s", "train_split": "train_aug"}
    config.update(
        labeled=f"cps/voc-fewsup/{protocol}",
        method="cps_cutmix",
        cps_weight=1.0,
        max_train_steps=40000,
        output_dir=f"outputs/voc_r101_{count}_cps_cutmix",
    )
    config["preset_note"] = (
        f"Few-supervision (paper Table 5, PseudoSeg protocol): {count} labels from the 1,464 train images, the rest "
        "of train_aug unlabeled; DeepLabv3+ R101 with CutMix. Hyper-parameters: the original code's effective "
        "values. Budget: 40k iterations (the paper does not state it; this matches its other VOC runs). "
        f"Paper mIoU: {paper}."
    )
    return f"voc_r101_{count}_cps_cutmix.yaml", config


def all_presets() -> dict[str, dict]:
    presets = {}
    for dataset, archs in (("voc", ("r50", "r101")), ("cityscapes", ("r50", "r101", "hrnet"))):
        for arch in archs:
            for protocol in FRACTIONS:
                for method in ("cps", "cps_cutmix"):
                    name, config = preset(dataset, arch, protocol, method)
                    presets[name] = config
    for count, protocol in ((92, "1-16"), (183, "1-8"), (366, "1-4"), (732, "1-2")):
        name, config = few_supervision(count, protocol)
        presets[name] = config
    return presets


def render(config: dict) -> str:
    ordered = {"preset_note": config["preset_note"], **{k: config[k] for k in sorted(config) if k != "preset_note"}}
    return "# Generated by configs/generate_presets.py; edit the tables there.\n" + yaml.safe_dump(
        ordered, sort_keys=False, width=100
    )


def main(argv: list[str]) -> int:
    stale = []
    for name, config in all_presets().items():
        path = HERE / name
        text = render(config)
        if "--check" in argv:
            if not path.exists() or path.read_text() != text:
                stale.append(name)
        else:
            path.write_text(text)
    if stale:
        print(f"presets out of date (run python configs/generate_presets.py): {stale}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
