"""The MSRC study's runs: which runs a setting makes, in two phases, and the one choice the validation images make.

Phase 1: every method at the main fraction (1/8) and the fixed rows at 1/4 (supervised, CPS + CutMix). Phase 2:
the `picked` methods whose final weights have the best mean validation mIoU at 1/8 over the seeds, at 1/4. The
choice is written once to <runs-dir>/quarter_selection.json and reused, so an interrupted study resumes into the
same plan. Training, resuming and the run records are ssl_study_parts.runner's.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import statistics
from pathlib import Path

from cps_hf.errors import UserInputError

from ssl_study_parts import _load_script, say
from ssl_study_parts.runner import Run, train_flags
from ssl_study_parts.settings import fraction_tag

from .settings import BASELINE, NOT_A_METHOD, TRAIN_OVERRIDES, VARIANTS

SELECTION = "quarter_selection.json"
VAL_RESULTS = "val_results.json"  # the final weights on the validation split: what the 1/4 choice reads


def data_identity(root: Path) -> dict:
    """What the runs train and are scored on, independent of where the folder lies: the class list and, per
    split, the image ids (the files the trainer's folder loader reads) and a digest of their label files."""
    classes_file = root / "classes.json"
    if not classes_file.is_file():
        raise UserInputError(f"{root}: no classes.json; prepare MSRC-21 first (docs/msrc.md: scripts/prepare_msrc.py) "
                             "or give --data-root")
    classes = json.loads(classes_file.read_text())
    splits = {}
    for split in ("train", "val", "test"):
        images = root / split / "images"
        if not images.is_dir():
            raise UserInputError(f"{root}: no {split}/images folder; give the folder scripts/prepare_msrc.py wrote")
        ids = sorted(p.stem for p in images.iterdir() if p.is_file())
        digest = hashlib.sha256()
        for sample_id in ids:
            label = root / split / "labels" / f"{sample_id}.png"
            digest.update(sample_id.encode() + b"\0" + (label.read_bytes() if label.is_file() else b""))
        splits[split] = {"images": len(ids), "ids_and_labels_sha256": digest.hexdigest()}
    return {"classes": classes["classes"], "ignore_index": classes.get("ignore_index"), "splits": splits}


def _run(setting: dict, runs_dir: Path, data_root: Path, data: dict, fraction: str, variant: str, seed: int) -> Run:
    method, extra, _ = VARIANTS[variant]
    train = {**setting["train"], **TRAIN_OVERRIDES.get(variant, {})}
    flags = train_flags(train) + ["--labeled", fraction, "--method", method, *extra, "--seed", str(seed)]
    return Run(fraction, variant, seed, runs_dir / fraction_tag(fraction) / f"{variant}_seed{seed}", flags,
               data_root, data)


def candidates(setting: dict) -> list[str]:
    """The methods the 1/4 choice is made among: those at 1/8 that are neither a baseline nor already fixed."""
    fixed = setting["quarter"]["fixed"]
    return [v for v in setting["methods"] if v not in NOT_A_METHOD and v not in fixed]


def plan_runs(setting: dict, runs_dir: Path, data_root: Path, data: dict, picked: list[str] | None) -> list[Run]:
    """Phase 1, and phase 2 once `picked` is known (None: not yet)."""
    main, quarter = setting["main"], setting["quarter"]
    cells = [(main, variant) for variant in setting["methods"]]
    cells += [(quarter["fraction"], variant) for variant in quarter["fixed"] + (picked or [])
              if variant in setting["methods"] or variant == BASELINE]
    return [_run(setting, runs_dir, data_root, data, fraction, variant, seed)
            for fraction, variant in cells for seed in setting["seeds"]]


def val_score(run: Run, data_root: Path, max_samples: int | None) -> float:
    """The run's final weights on the validation split (scripts/evaluate_cps.py in this process, the trainer's
    protocol), cached in its folder."""
    cached = run.folder / VAL_RESULTS
    if not cached.is_file():
        argv = ["--model", str(run.folder / "model"), "--dataset", "folder", "--data_root", str(data_root),
                "--split", "val", "--output", str(cached)]
        argv += ["--max_samples", str(max_samples)] if max_samples else []
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            _load_script("evaluate_cps").main(argv)
    return json.loads(cached.read_text())["eval_mean_iou"]


def selection(setting: dict, runs_dir: Path, data_root: Path, data: dict) -> dict | None:
    """The 1/4 phase's methods: read from quarter_selection.json when it was made for these candidates and seeds,
    else chosen now if every candidate's 1/8 runs are finished, else None (phase 1 is not done)."""
    wanted = {"fraction": setting["main"], "candidates": candidates(setting), "seeds": setting["seeds"],
              "picked_count": setting["quarter"]["picked"]}
    path = runs_dir / SELECTION
    if path.is_file():
        recorded = json.loads(path.read_text())
        if {key: recorded.get(key) for key in wanted} == wanted:
            return recorded
    runs = [r for r in plan_runs(setting, runs_dir, data_root, data, None)
            if r.fraction == setting["main"] and r.variant in wanted["candidates"]]
    if any(not (r.folder / "all_results.json").is_file() for r in runs):
        return None
    scores: dict[str, dict[int, float]] = {}
    for run in runs:
        scores.setdefault(run.variant, {})[run.seed] = val_score(run, data_root, setting["select_max_samples"])
    means = {variant: statistics.fmean(values.values()) for variant, values in scores.items()}
    ranked = sorted(means, key=lambda v: (-means[v], wanted["candidates"].index(v)))
    chosen = {**wanted, "by": "mean validation mIoU of the final weights over the seeds, at the main fraction",
              "val_mean_iou": {v: {"mean": means[v], "per_seed": scores[v]} for v in ranked},
              "picked": ranked[:wanted["picked_count"]]}
    runs_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(chosen, indent=1) + "\n")
    if chosen["picked"]:
        say(f"picked for {setting['quarter']['fraction']} by validation mIoU at {setting['main']}: "
            + ", ".join(f"{v} ({100 * means[v]:.1f})" for v in chosen["picked"]))
    return chosen
