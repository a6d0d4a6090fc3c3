"""What the study is: the methods it compares, the settings (full, quick, tiny) and its label fractions.

Data, not code. Every run's trainer flags and data come from here and its folder's identity record
(study_run.json) holds them: change a run's flags or data and its finished folder is refused, not reused.
"""

from __future__ import annotations

# name -> (trainer --method, extra trainer flags, label in tables and plots). Order = table order.
VARIANTS: dict[str, tuple[str, list[str], str]] = {
    "supervised": ("supervised", [], "supervised"),
    "mean_teacher": ("mean_teacher", [], "mean teacher"),
    "mean_teacher_cutmix": ("mean_teacher_cutmix", [], "mean teacher + CutMix"),
    # CutMix-Seg freezes the encoder's BN statistics, which from random init stay at their initial 0 / 1
    "mean_teacher_cutmix_bn": ("mean_teacher_cutmix", ["--freeze_bn", "false"],
                               "mean teacher + CutMix, encoder BN trained"),
    "sps": ("sps", [], "SPS (self pseudo labels)"),
    "sps_cutmix": ("sps_cutmix", [], "SPS + CutMix"),
    "cpc": ("cpc", [], "CPC (cross probability consistency)"),
    "cps": ("cps", [], "CPS"),
    "cps_cutmix": ("cps_cutmix", [], "CPS + CutMix"),
    # the reference's form (the default): each network's N - 1 pseudo-label terms averaged, so the
    # unlabeled weight equals CPS's
    "ncps": ("ncps", ["--num_networks", "3"], "n-CPS (N = 3)"),
    "ncps_sum": ("ncps", ["--num_networks", "3", "--ncps_sum"], "n-CPS (N = 3), summed over peers"),
    # UniMatch's normalisation (the default): the thresholded loss is divided by all pixels
    "cps_cutmix_t0.95": ("cps_cutmix", ["--pseudo_label_threshold", "0.95"], "CPS + CutMix, threshold 0.95"),
    # the same runs with the loss a mean over the kept pixels only (this package's form before)
    "cps_cutmix_t0.95_kept": ("cps_cutmix", ["--pseudo_label_threshold", "0.95", "--pseudo_label_normalize", "kept"],
                              "CPS + CutMix, threshold 0.95, mean over kept pixels"),
    # UniMatch's normalisation with lambda 1.5: the kept-pixel mean's average weight (it keeps ~2/3 of the pixels)
    "cps_cutmix_t0.95_l1.5": ("cps_cutmix", ["--pseudo_label_threshold", "0.95", "--cps_weight", "1.5"],
                              "CPS + CutMix, threshold 0.95, lambda 1.5"),
    # FlexMatch-style class-aware bars under the same 0.95 threshold: do the rare classes survive?
    "cps_cutmix_t0.95_classaware": ("cps_cutmix", ["--pseudo_label_threshold", "0.95", "--pseudo_label_class_aware"],
                                    "CPS + CutMix, threshold 0.95, class-aware bars"),
    # weak-to-strong consistency as UniMatch's code runs it (0.95 threshold, same-image CutMix partners)
    "fixmatch": ("fixmatch", [], "FixMatch (UniMatch's)"),
    "fixmatch_ema": ("fixmatch", ["--ema_teacher"], "FixMatch with an EMA teacher (UniMatch V2's)"),
    "unimatch": ("unimatch", [], "UniMatch"),
    "unimatch_v2": ("unimatch_v2", [], "UniMatch V2 (its method on the study's CNN)"),
    "cps_strong": ("cps_strong", [], "CPS across strong views"),
    # the study's classes are hue families x tones: colour jitter and grayscale change what a pixel's class is
    "unimatch_nocolour": ("unimatch", ["--strong_color_jitter_p", "0", "--strong_grayscale_p", "0"],
                          "UniMatch, strong views without colour ops"),
    "cps_strong_nocolour": ("cps_strong", ["--strong_color_jitter_p", "0", "--strong_grayscale_p", "0"],
                            "CPS across strong views without colour ops"),
}
CPS_FAMILY = ("cps", "cps_cutmix", "ncps", "ncps_sum", "cps_cutmix_t0.95", "cps_cutmix_t0.95_kept",
              "cps_cutmix_t0.95_l1.5", "cps_cutmix_t0.95_classaware", "cps_strong", "cps_strong_nocolour")
FIGURE_VARIANTS = ("supervised", "mean_teacher_cutmix", "cps", "cps_cutmix")  # predictions.png columns
REFERENCE = "all"  # the fraction tag of the supervised all-labels ceiling

# The settings, as data. "train" holds scripts/train_cps.py fields (the same for every run).
_TRAIN_COMMON = {
    "backbone": "test_resnet", "pretrained_backbone": "none", "crop_size": 64, "scales": [0.75, 1.0, 1.25],
    "aspp_channels": 64, "decoder_channels": 64, "low_level_channels": 16, "per_device_train_batch_size": 8,
    "learning_rate": 0.02, "weight_decay": 0.0001, "cps_weight": 1.0, "logging_steps": 25,
    "checkpoints_total_limit": 1, "num_workers": 0,
}
SETTINGS: dict[str, dict] = {
    "full": {
        "purpose": "the study",
        "data": {"num_train": 800, "num_val": 200, "size": [64, 96], "seed": 0, "val_seed": 1000},
        "train": {**_TRAIN_COMMON, "max_train_steps": 500, "eval_steps": 250, "checkpointing_steps": 100},
        "fractions": ["1/16", "1/4"], "seeds": [0, 1, 2], "methods": list(VARIANTS), "reference": True,
        "runs_dir": "outputs/ssl_study", "docs_dir": "docs/study",
    },
    "quick": {
        "purpose": "a pipeline check (every method starts, trains, evaluates and reports); its numbers mean nothing",
        "data": {"num_train": 160, "num_val": 40, "size": [64, 96], "seed": 0, "val_seed": 1000},
        "train": {**_TRAIN_COMMON, "max_train_steps": 40, "eval_steps": 20, "checkpointing_steps": 20},
        "fractions": ["1/16"], "seeds": [0], "methods": list(VARIANTS), "reference": False,
        "runs_dir": "outputs/ssl_study_quick", "docs_dir": "outputs/ssl_study_quick/report",
    },
    "tiny": {
        "purpose": "the tests: two methods, two steps, 32-px images",
        "data": {"num_train": 16, "num_val": 4, "size": [32, 40], "seed": 0, "val_seed": 1000},
        "train": {**_TRAIN_COMMON, "crop_size": 32, "per_device_train_batch_size": 2, "max_train_steps": 2,
                  "logging_steps": 1, "checkpointing_steps": 1},
        "fractions": ["1/4"], "seeds": [0], "methods": ["supervised", "cps"], "reference": False,
        "runs_dir": "outputs/ssl_study_tiny", "docs_dir": "outputs/ssl_study_tiny/report",
    },
}


def fraction_tag(fraction: str) -> str:
    return fraction.replace("/", "-")


def fraction_value(fraction: str) -> float:
    if fraction == REFERENCE:
        return 1.0
    numerator, denominator = fraction.split("/")
    return int(numerator) / int(denominator)

