#!/usr/bin/env python
"""Writes the paper presets in configs/ from the small tables below (timm-style data-only variants).

    python configs/generate_presets.py          # rewrite the YAML files
    python configs/generate_presets.py --check  # exit 1 if a file differs (the tests run this)

Numbers come from the official code, charlesCXK/TorchSemiSeg ("effective" values of the original
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
        f"Few-supervision (paper Table 5, PseudoSeg protocol): {count} labels from the 1,464 train images, all the "
        f"rest of train_aug ({10582 - count:,} images) unlabeled, as the paper's Section 5.3 says (the official "
        "code's pseudoseg_unlabeled lists hold only the rest of train: --labeled cps/voc-fewsup-train-only/"
        f"{count}); DeepLabv3+ R101 with CutMix. Hyper-parameters: the original code's effective "
        "values. Budget: 40k iterations (the paper does not state it; this matches its other VOC runs). "
        f"Paper mIoU: {paper}."
    )
    return f"voc_r101_{count}_cps_cutmix.yaml", config


# ---- baselines of Tables 1 / 2 and the paper's ablations (Tables 4, 6, Figures 4, 5) ----------

BASELINE_MIOU = {  # Table 1 (VOC) / Table 2 (Cityscapes): MT and CutMix-Seg as the paper ran them
    ("voc", "r50", "mean_teacher"): [66.77, 70.78, 73.22, 75.41],
    ("voc", "r101", "mean_teacher"): [70.59, 73.20, 76.62, 77.61],
    ("voc", "r50", "mean_teacher_cutmix"): [68.90, 70.70, 72.46, 74.49],
    ("voc", "r101", "mean_teacher_cutmix"): [72.56, 72.69, 74.25, 75.89],
    ("cityscapes", "r50", "mean_teacher"): [66.14, 72.03, 74.47, 77.43],
    ("cityscapes", "r101", "mean_teacher"): [68.08, 73.71, 76.53, 78.59],
}
SUPERVISED_1_8 = {("voc", "r50"): 69.43, ("voc", "r101"): 72.21, ("cityscapes", "r50"): 70.32,
                  ("cityscapes", "r101"): 72.19}  # Table 4, first row; other protocols only in Figure 2
TABLE4 = {  # row name -> (method, switches, paper mIoU VOC R50/R101, Cityscapes R50/R101)
    "cps-l": ("cps", {"cps_on_unlabeled": False}, (69.99, 72.98, 71.73, 73.08)),
    "cps-u": ("cps", {"cps_on_labeled": False}, (73.00, 75.83, 73.97, 75.28)),
    "cpc": ("cpc", {}, (71.23, 74.01, 72.03, 73.77)),
}
SPS_MIOU = {"sps": [59.54, 69.05, 72.55, 75.17], "sps_cutmix": [65.62, 71.27, 73.70, 74.87]}  # Table 6, VOC R50
LAMBDA_SWEEP = {"voc": [0.5, 1.0, 1.5, 2.0, 3.0], "cityscapes": [1.0, 3.0, 6.0, 9.0, 12.0]}


def _derived(dataset: str, arch: str, protocol: str, method: str, name: str, note: str, **changes) -> tuple[str, dict]:
    """A variant of the CPS preset of the same cell: same data, budget and optimiser, other method/flags."""
    base_method = "cps_cutmix" if method.endswith("cutmix") else "cps"
    _, config = preset(dataset, arch, protocol, base_method)
    config.update(method=method, output_dir=f"outputs/{name}", **changes)
    cps_note = config["preset_note"].rsplit(" Paper mIoU:", 1)[0]  # that number is CPS's, not this method's
    config["preset_note"] = f"{note} Otherwise as the {base_method} preset of this cell (same data, iterations, batch and optimiser): {cps_note}"
    return f"{name}.yaml", config


def baseline_presets() -> dict[str, dict]:
    presets = {}
    for dataset, archs in (("voc", ("r50", "r101")), ("cityscapes", ("r50", "r101"))):
        short = "voc" if dataset == "voc" else "city"
        for arch in archs:
            for index, protocol in enumerate(FRACTIONS):
                sup = SUPERVISED_1_8.get((dataset, arch)) if protocol == "1-8" else None
                name, config = _derived(
                    dataset, arch, protocol, "supervised", f"{short}_{arch}_{protocol}_supervised",
                    "Supervised baseline (paper Figure 2; labeled images only, one network). "
                    + (f"Paper mIoU (Table 4, L_s only): {sup}." if sup else "Paper mIoU: read from Figure 2."),
                )
                presets[name] = config
                for method in ("mean_teacher", "mean_teacher_cutmix"):
                    if (dataset, arch, method) not in BASELINE_MIOU:
                        continue  # the paper has no CutMix-Seg numbers on Cityscapes
                    paper = BASELINE_MIOU[(dataset, arch, method)][index]
                    if method == "mean_teacher":
                        label = ("Mean teacher (MT, Table 1/2) as PixelSSL's MT code runs it (the method's defaults): "
                                 "MSE of logits, lambda ramped up over 3 epochs, EMA decay min(1 - 1/(t+1), 0.99) "
                                 "over the parameters, no input noise, the student exported")
                    else:
                        label = ("CutMix-Seg (mean teacher + CutMix, Table 1) as its CutMix scripts run it (the "
                                 "method's defaults): softmax distance weighted by the fraction of teacher pixels "
                                 "at 0.97 confidence, one 50% box, EMA 0.99 over the whole state, frozen encoder "
                                 "BN statistics, the teacher evaluated and exported")
                    name, config = _derived(
                        dataset, arch, protocol, method, f"{short}_{arch}_{protocol}_{method}",
                        f"{label}; lambda 1, as both codes' scripts (cons_scale / cons_weight 1; the paper does not "
                        f"state MT's weight). Paper mIoU (from the implementations the paper ran): {paper}.",
                        cps_weight=1.0,
                    )
                    presets[name] = config
    for dataset in ("voc", "cityscapes"):
        short = "voc" if dataset == "voc" else "city"
        for column, arch in enumerate(("r50", "r101")):
            for row, (method, switches, paper) in TABLE4.items():
                value = paper[column + (0 if dataset == "voc" else 2)]
                name, config = _derived(
                    dataset, arch, "1-8", method, f"{short}_{arch}_1-8_table4_{row}",
                    f"Table 4 ablation row {row} ({', '.join(f'{k}={v}' for k, v in switches.items()) or 'CPC on labeled and unlabeled'}). "
                    f"Paper mIoU: {value}. The rows L_s and L_s + L_cps^l + L_cps^u are the "
                    f"{short}_{arch}_1-8_supervised and {short}_{arch}_1-8_cps presets.",
                    **switches,
                )
                presets[name] = config
            for weight in LAMBDA_SWEEP[dataset]:
                name, config = _derived(
                    dataset, arch, "1-8", "cps", f"{short}_{arch}_1-8_lambda{weight:g}",
                    f"Figure 4 lambda sweep, lambda {weight:g} (the paper's best: 1.5 VOC, 6 Cityscapes; the text gives "
                    "neither its backbone nor its other points, which are this sweep's choice).",
                    cps_weight=weight,
                )
                presets[name] = config
    for index, protocol in enumerate(FRACTIONS):
        for method, values in SPS_MIOU.items():
            name, config = _derived(
                "voc", "r50", protocol, method, f"voc_r50_{protocol}_{method}",
                f"Table 6, single-network pseudo supervision ({method}); lambda as CPS's. Paper mIoU: {values[index]}.",
            )
            presets[name] = config
        name, config = _derived(
            "voc", "r50", protocol, "cps", f"voc_r50_{protocol}_cps_plus",
            "Figure 5 'Ours+': CPS without CutMix trained twice as many epochs as the CPS preset, comparable with a "
            "two-stage self-training run (the paper does not state the exact epochs or backbone; R50 and 2x are "
            "this preset's choice).",
            num_train_epochs=2 * VOC_EPOCHS[protocol],
        )
        presets[name] = config
    return presets


# ---- modern encoders: DINOv2-S (UniMatch V2's recipe) and ConvNeXt-T, CPS + CutMix and supervised ----

# UniMatch V2 (github.com/LiheYoung/UniMatch-V2: configs/pascal.yaml, configs/cityscapes.yaml, unimatch_v2.py,
# supervised.py, dataset/semi.py, model/semseg/dpt.py): AdamW betas (0.9, 0.999), weight decay 0.01, encoder
# lr 5e-6 and everything else x40, poly 0.9 per iteration, no warm-up, no drop path; the DPT head taps blocks
# 3/6/9/12 of ViT-S; crop 518 VOC / 798 Cityscapes; 4 / 2 images per GPU on 4 GPUs; 60 / 180 epochs over the
# unlabeled set; OHEM (0.7, 200k pixels per GPU batch) on Cityscapes, whose windows are 798 at stride 532.
DINOV2 = dict(
    backbone="vit_small_patch14_dinov2.lvd142m", output_stride=None, multi_grid=None, vit_feature_indices=[2, 5, 8, 11],
    optimizer="adamw", adam_betas=[0.9, 0.999], learning_rate=5e-6, head_lr_multiplier=40.0, weight_decay=0.01,
    warmup_steps=0, drop_path_rate=0.0, lr_power=0.9,
)
DINOV2_DATA = {
    "voc": dict(crop_size=518, global_batch_size=16, num_train_epochs=60),
    "cityscapes": dict(crop_size=798, global_batch_size=8, num_train_epochs=180, ohem_min_kept=200000,
                       ohem_images_per_group=2, eval_crop_size=798, eval_stride=532),
}
DINOV2_PROTOCOLS = {"voc": ["92", "183", "366", "732", "1464"], "cityscapes": ["1-8"]}  # UniMatch's splits
# Best val mIoU of the run in UniMatch V2's DINOv2-S logs, (labeled only, UniMatch V2):
# training-logs/table01-pascal_{labeled_only,unimatch_v2}_<n>labels_dinov2_small.log, table02-cityscapes_..._1_8...
UNIMATCH_V2_SMALL = {
    ("voc", "92"): (66.98, 79.11), ("voc", "183"): (75.63, 85.57), ("voc", "366"): (81.82, 85.86),
    ("voc", "732"): (83.69, 86.64), ("voc", "1464"): (85.56, 87.89), ("cityscapes", "1-8"): (80.22, 81.90),
}
# ConvNeXt-T: the ConvNeXt authors' segmentation recipe (github.com/facebookresearch/ConvNeXt,
# semantic_segmentation/configs/convnext/upernet_convnext_tiny_512_160k_ade20k_ms.py: UperNet on ADE20K, 160k
# iterations at batch 16): AdamW lr 1e-4, betas (0.9, 0.999), weight decay 0.05, 1500 linear warm-up iterations,
# poly power 1.0, drop path 0.4, ImageNet-1k weights, and layer decay 0.9 stage-wise (6 layers: stem 0.9^5 = 0.59
# ... last stage 0.9, head 1). --layer_decay numbers timm's layers per block (stem, 18 blocks, head: 20), where
# 0.97 per block gives the same profile: stem 0.56, stage 2 0.69-0.89, last stage 0.91-0.97, head 1.
CONVNEXT = dict(
    backbone="convnext_tiny.fb_in1k", output_stride=16, multi_grid=None, optimizer="adamw", adam_betas=[0.9, 0.999],
    learning_rate=1e-4, head_lr_multiplier=1.0, weight_decay=0.05, layer_decay=0.97, warmup_steps=1500, lr_power=1.0,
    drop_path_rate=0.4,
)


def dinov2_preset(dataset: str, protocol: str, method: str) -> tuple[str, dict]:
    short = "voc" if dataset == "voc" else "city"
    base = VOC if dataset == "voc" else CITY
    supervised_miou, unimatch_miou = UNIMATCH_V2_SMALL[(dataset, protocol)]
    config = {**COMMON, **base, **DINOV2, **DINOV2_DATA[dataset]}
    name = f"{short}_dinov2s_{protocol}_{method}"
    config.update(labeled=f"unimatch/{dataset}/{protocol}", method=method, cps_weight=LAMBDA[(dataset, "cps_cutmix")],
                  output_dir=f"outputs/{name}")
    config.pop("momentum")
    budget = DINOV2_DATA[dataset]
    labels = f"{protocol} labels" if dataset == "voc" else f"{FRACTIONS[protocol]} labels"
    expect = (f"UniMatch V2's labeled-only DINOv2-S run reached {supervised_miou} (its supervised.py: batch 2x, "
              "3,000 samples per epoch, so fewer iterations than this preset)" if method == "supervised" else
              f"UniMatch V2 DINOv2-S reached {unimatch_miou} with its own method (EMA teacher, 0.95 confidence, "
              f"two strong views, complementary dropout); its labeled-only run {supervised_miou}; no published "
              "CPS number with this encoder")
    config["preset_note"] = (
        f"DINOv2 ViT-S/14 ({labels}, {dataset}, UniMatch's split, = UniMatch V2's). Recipe from UniMatch V2 "
        "(configs/, unimatch_v2.py): AdamW (0.9, 0.999), wd 0.01, encoder lr 5e-6 and neck + head x40, poly 0.9, no "
        f"warm-up, no drop path, crop {budget['crop_size']}, global batch {budget['global_batch_size']}+"
        f"{budget['global_batch_size']}, {budget['num_train_epochs']} epochs over the unlabeled set. Ours: "
        f"{'supervised (labeled images only, one network)' if method == 'supervised' else 'CPS + CutMix, lambda ' + str(config['cps_weight'])}"
        ", the DeepLabv3+ head on blocks 3/6/9/12 through a ViT neck (stride ~4 and 14) instead of their DPT "
        "head, no output stride or multi-grid, CPS's discrete scales; "
        + ("whole val images padded to 518 (they resize to a multiple of 14)" if dataset == "voc" else
           "798 windows at stride 532 as theirs") + f". Expect (best val mIoU of the logs): {expect}."
    )
    return f"{name}.yaml", config


def convnext_preset(method: str) -> tuple[str, dict]:
    _, config = preset("voc", "r50", "1-8", "cps_cutmix")
    name = f"voc_convnext-t_1-8_{method}"
    config.update(CONVNEXT, method=method, output_dir=f"outputs/{name}")
    config.pop("momentum")
    ours = "supervised (labeled images only, one network)" if method == "supervised" else "CPS + CutMix, lambda 1.0"
    config["preset_note"] = (
        "DeepLabv3+ ConvNeXt-T (ImageNet-1k, OS16 by dilating the last stage; no multi-grid), 1/8 labels (voc, CPS "
        "partition), " + ours + ". Recipe from the ConvNeXt authors' UperNet ADE20K config "
        "(upernet_convnext_tiny_512_160k_ade20k_ms.py): AdamW (0.9, 0.999) lr 1e-4, wd 0.05, 1500 warm-up steps, "
        "poly 1.0, drop path 0.4, stage-wise layer decay 0.9 (here 0.97 per timm block, the same profile: stem "
        "~0.56, last stage ~0.9); kept as is although they trained 160k steps at batch 16 "
        "(here CPS's 34 epochs, ~39.7k steps at batch 8+8, crop 512). No published number with this encoder: "
        "compare with voc_r50 / voc_r101_1-8_" + method + " (paper mIoU "
        + ("69.43 / 72.21" if method == "supervised" else "73.67 / 76.44") + ") run the same way."
    )
    return f"{name}.yaml", config


# ---- today's leaders: UniMatch V1 (ResNet-101) and UniMatch V2 (DINOv2-S/B with its DPT head) --------------

# UniMatch V1 (github.com/LiheYoung/UniMatch: configs/pascal.yaml, configs/cityscapes.yaml, unimatch.py,
# model/semseg/deeplabv3plus.py): DeepLabv3+ on a deep-stem ResNet-101 at output stride 16 (the last stage
# dilated, no multi-grid), ASPP 6/12/18; SGD momentum 0.9, weight decay 1e-4, poly 0.9 per iteration; VOC: lr 1e-3
# with the head x10, crop 321, 80 epochs, threshold 0.95, CE; Cityscapes: lr 5e-3 with the head x1, crop 801,
# 240 epochs, threshold 0, OHEM (0.7, 200k pixels per GPU batch of 2), windows of 801 at stride 534; 2 + 2 images
# per GPU on 4 GPUs. Their README's numbers (R101): VOC 92..1464 labels, Cityscapes 1/16..1/2.
UNIMATCH_V1 = dict(backbone="resnet101s", output_stride=16, multi_grid=None, aspp_rates=[6, 12, 18],
                   optimizer="sgd", momentum=0.9, weight_decay=1e-4, lr_power=0.9, global_batch_size=8,
                   method="unimatch", cps_weight=1.0)
UNIMATCH_V1_DATA = {
    "voc": dict(learning_rate=1e-3, head_lr_multiplier=10.0, crop_size=321, num_train_epochs=80,
                pseudo_label_threshold=0.95),
    "cityscapes": dict(learning_rate=5e-3, head_lr_multiplier=1.0, crop_size=801, num_train_epochs=240,
                       pseudo_label_threshold=0.0, ohem_min_kept=200000, ohem_images_per_group=2, eval_crop_size=801,
                       eval_stride=534),
}
UNIMATCH_V1_MIOU = {"voc": {"92": 75.2, "183": 77.2, "366": 78.8, "732": 79.9, "1464": 81.2},
                    "cityscapes": {"1-16": 76.6, "1-8": 77.9, "1-4": 79.2, "1-2": 79.5}}
# UniMatch V2 DINOv2-B (its README; the same configs as -S with the base encoder) and -S (best val of its logs,
# UNIMATCH_V2_SMALL for what they hold; its README gives no -S Cityscapes numbers but 1/8).
UNIMATCH_V2_BASE_MIOU = {"voc": {"92": 86.3, "183": 87.9, "366": 88.9, "732": 90.0, "1464": 90.8},
                         "cityscapes": {"1-16": 83.6, "1-8": 84.3, "1-4": 84.5, "1-2": 85.1}}
DINOV2_ENCODERS = {"s": "vit_small_patch14_dinov2.lvd142m", "b": "vit_base_patch14_dinov2.lvd142m"}


def unimatch_v1_preset(dataset: str, protocol: str) -> tuple[str, dict]:
    short = "voc" if dataset == "voc" else "city"
    name = f"{short}_r101_{protocol}_unimatch"
    config = {**COMMON, **(VOC if dataset == "voc" else CITY), **UNIMATCH_V1, **UNIMATCH_V1_DATA[dataset]}
    config.update(labeled=f"unimatch/{dataset}/{protocol}", output_dir=f"outputs/{name}")
    labels = f"{protocol} labels" if dataset == "voc" else f"{FRACTIONS[protocol]} labels"
    data = config
    config["preset_note"] = (
        f"UniMatch V1 ({labels}, {dataset}, UniMatch's split) as its code runs it (the method's defaults: two "
        "strong views, feature perturbation 0.5, same-image CutMix, (L_x + L_u) / 2): DeepLabv3+ R101 (deep stem, "
        f"OS16, no multi-grid), SGD lr {data['learning_rate']:g} with the head x{data['head_lr_multiplier']:g}, wd 1e-4, "
        f"poly 0.9, crop {data['crop_size']}, global batch 8+8, {data['num_train_epochs']} epochs over the unlabeled set, "
        f"threshold {data['pseudo_label_threshold']:g}"
        + (", OHEM 0.7 / 200k pixels per 2 images, windows 801 at stride 534" if dataset == "cityscapes" else "")
        + ". Ours differ: CPS's discrete scales (they draw 0.5-2.0), weight decay spared on norms and biases "
        "(they decay everything), ImageNet weights from timm's resnet101s. "
        f"Their README (R101): {UNIMATCH_V1_MIOU[dataset][protocol]}."
    )
    return f"{name}.yaml", config


def unimatch_v2_preset(dataset: str, protocol: str, size: str) -> tuple[str, dict]:
    short = "voc" if dataset == "voc" else "city"
    name = f"{short}_dinov2{size}_{protocol}_unimatch_v2"
    base = VOC if dataset == "voc" else CITY
    config = {**COMMON, **base, **DINOV2, **DINOV2_DATA[dataset]}
    config.pop("momentum")
    config.update(backbone=DINOV2_ENCODERS[size], decode_head="dpt", labeled=f"unimatch/{dataset}/{protocol}",
                  method="unimatch_v2", cps_weight=1.0, pseudo_label_threshold=0.95, output_dir=f"outputs/{name}")
    budget = DINOV2_DATA[dataset]
    labels = f"{protocol} labels" if dataset == "voc" else f"{FRACTIONS[protocol]} labels"
    if size == "b":
        expect = f"their README (DINOv2-B): {UNIMATCH_V2_BASE_MIOU[dataset][protocol]}"
    elif (dataset, protocol) in UNIMATCH_V2_SMALL:
        expect = f"best val mIoU of their DINOv2-S log: {UNIMATCH_V2_SMALL[(dataset, protocol)][1]}"
    else:
        expect = "no published DINOv2-S number for this split (DINOv2-B: " \
                 f"{UNIMATCH_V2_BASE_MIOU[dataset][protocol]})"
    config["preset_note"] = (
        f"UniMatch V2 (DINOv2 ViT-{size.upper()}/14, {labels}, {dataset}, UniMatch's split) as its code runs it (the "
        "method's defaults: EMA teacher 0.996, 0.95 confidence, two strong views with complementary channel "
        "dropout, (L_x + L_u) / 2) with its DPT head on blocks 3/6/9/12: AdamW (0.9, 0.999), wd 0.01, encoder lr "
        f"5e-6 and head x40, poly 0.9, no warm-up, crop {budget['crop_size']}, global batch "
        f"{budget['global_batch_size']}+{budget['global_batch_size']}, {budget['num_train_epochs']} epochs over the "
        "unlabeled set" + (", OHEM 0.7 / 200k pixels per 2 images, windows 798 at stride 532" if dataset == "cityscapes"
                           else "") + ". Ours differ: CPS's discrete scales (they draw 0.5-2.0), "
        + ("whole val images padded to a multiple of 14 (they resize)" if dataset == "voc" else "the same windows")
        + f"; the student is exported (they evaluate both and keep the student's best). Expect: {expect}."
    )
    return f"{name}.yaml", config


def leader_presets() -> dict[str, dict]:
    presets = {}
    for dataset, protocols in UNIMATCH_V1_MIOU.items():
        for protocol in protocols:
            name, config = unimatch_v1_preset(dataset, protocol)
            presets[name] = config
            for size in DINOV2_ENCODERS:
                name, config = unimatch_v2_preset(dataset, protocol, size)
                presets[name] = config
    return presets


def encoder_presets() -> dict[str, dict]:
    presets = {}
    for dataset, protocols in DINOV2_PROTOCOLS.items():
        for protocol in protocols:
            for method in ("cps_cutmix", "supervised"):
                name, config = dinov2_preset(dataset, protocol, method)
                presets[name] = config
    for method in ("cps_cutmix", "supervised"):
        name, config = convnext_preset(method)
        presets[name] = config
    return presets


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
    presets.update(baseline_presets())
    presets.update(encoder_presets())
    presets.update(leader_presets())
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
