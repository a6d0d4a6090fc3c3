"""The MSRC study's figures: miou_by_method.png (every method's test mIoU and paired difference, every seed) and
predictions.png (scripts/make_figures.py's Figure-6 grid on test images picked by a fixed rule).
"""

from __future__ import annotations

import contextlib
import io
import shutil
import statistics
from pathlib import Path

import numpy as np
from PIL import Image

from ssl_study_parts import _load_script
from ssl_study_parts.aggregate import ordered_fractions
from ssl_study_parts.runner import Run

from .settings import BASELINE, FOCUS_CLASSES, VARIANTS


def plot_by_method(summary: dict, path: Path, title: str) -> Path:
    """Left: test mIoU per method (dots: seeds, diamond: mean), one colour per fraction. Right: the paired
    difference to supervised at the same fraction and seed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    table = summary["table"]
    fractions = ordered_fractions(table)
    variants = [v for v in VARIANTS if any(v in table[f] for f in fractions)]
    figure = Figure(figsize=(11, 0.42 * len(variants) + 1.6), dpi=110)
    FigureCanvasAgg(figure)
    left, right = figure.subplots(1, 2, sharey=True, gridspec_kw={"wspace": 0.05})
    ys = {v: len(variants) - 1 - i for i, v in enumerate(variants)}
    for index, fraction in enumerate(fractions):
        color = f"C{index}"
        offset = (index - (len(fractions) - 1) / 2) * 0.25
        for variant in variants:
            cell = table[fraction].get(variant)
            if not cell:
                continue
            y = ys[variant] + offset
            values = [100 * v for v in cell["per_seed"].values()]
            left.scatter(values, [y] * len(values), s=14, alpha=0.5, color=color)
            left.scatter([statistics.fmean(values)], [y], marker="D", s=30, color=color,
                         label=f"{fraction} ({cell['num_labeled']} labeled)" if variant == BASELINE else None)
            deltas = [100 * d for d in cell["per_seed_delta"].values()] if variant != BASELINE else []
            if deltas:
                right.scatter(deltas, [y] * len(deltas), s=14, alpha=0.5, color=color)
                right.scatter([statistics.fmean(deltas)], [y], marker="D", s=30, color=color)
    right.axvline(0, color="black", linewidth=1)
    left.set_yticks(list(ys.values()))
    left.set_yticklabels([VARIANTS[v][2] for v in variants], fontsize=8)
    left.set_xlabel("test mIoU (%), final weights")
    right.set_xlabel("paired difference to supervised (points)")
    for axes in (left, right):
        axes.grid(alpha=0.3)
    left.legend(loc="upper center", bbox_to_anchor=(1.0, -0.07), ncol=len(fractions) + 1, fontsize=8,
                title="dots: seeds; diamond: mean", title_fontsize=8)  # under both panels: over none of the dots
    figure.suptitle(title, fontsize=9)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", bbox_inches="tight")
    return path


def pick_test_images(data_root: Path, count: int = len(FOCUS_CLASSES), share: float = 0.02) -> list[str]:
    """For each focus class, the first test image (id order) whose label has at least `share` of its pixels of it;
    topped up with the first test images."""
    import json

    names = json.loads((data_root / "classes.json").read_text())["classes"]
    ids = sorted(p.stem for p in (data_root / "test" / "images").iterdir() if p.is_file())
    shares = {}
    for sample_id in ids:
        label = np.asarray(Image.open(data_root / "test" / "labels" / f"{sample_id}.png"))
        shares[sample_id] = np.bincount(label.ravel(), minlength=256)[:len(names)] / label.size
    chosen = []
    for name in FOCUS_CLASSES:
        if name not in names:
            continue
        k = names.index(name)
        found = next((i for i in ids if i not in chosen and shares[i][k] >= share), None)
        if found:
            chosen.append(found)
    chosen += [i for i in ids if i not in chosen][:max(0, count - len(chosen))]
    return chosen[:count]


def plot_predictions(runs: list[Run], fraction: str, columns: list[str], data_root: Path,
                     path: Path) -> tuple[Path | None, dict | None]:
    """make_figures.py's grid for the lowest seed of `fraction`: image, ground truth, one column per variant."""
    finished = {(r.variant, r.seed): r for r in runs if r.fraction == fraction and (r.folder / "model").is_dir()}
    if not finished:
        return None, None
    seed = min(s for _, s in finished)
    shown = [finished[(v, seed)] for v in columns if (v, seed) in finished]
    if not shown:  # a study still under way: none of the picture's columns has finished at that seed
        return None, None
    ids = pick_test_images(data_root)
    scratch = path.parent / ".predictions_tmp"
    argv = ["--models", *(str(r.folder / "model") for r in shown),
            "--titles", *(VARIANTS[r.variant][2] for r in shown),
            "--dataset", "folder", "--data_root", str(data_root), "--split", "test", "--ids", *ids,
            "--output_dir", str(scratch), "--cell_size", "240", "180"]
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):  # protocol lines, bars
        written = _load_script("make_figures").main(argv)
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(written[0]), path)
    shutil.rmtree(scratch, ignore_errors=True)
    return path, {"fraction": fraction, "seed": seed, "columns": [r.variant for r in shown], "ids": ids}
