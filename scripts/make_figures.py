#!/usr/bin/env python
"""Figures like the paper's: the qualitative grid (Figure 6) and training / agreement curves (Figure 7).

    # input | ground truth | supervised | CPS, for the first 4 validation images
    python scripts/make_figures.py --models outputs/sup/model outputs/cps/model --titles Supervised CPS \
        --dataset voc --data_root data/VOC --split val --num_images 4 --output_dir figures
    # curves from the trainer's log (one JSON object per logged step)
    python scripts/make_figures.py --log outputs/cps/log.jsonl --output_dir figures

Writes comparison.png (cells at least 256 px, column titles, a legend of the classes shown, named
from the first model's id2label), training_curves.png (loss, loss_sup, loss_cps, lr: those present),
agreement.png (the fraction of pixels where the two branches' argmax agree: one labelled line per
agreement key the trainer logged, agreement_u / agreement_u_fg / agreement_l / agreement_l_fg) and
eval_mean_iou.png. Keys may carry a tracker prefix ("train/loss"). `--models` takes local folders
(an argument that looks like a path must be an existing folder) or Hub ids (owner/name). Each model
predicts under the protocol the trainer evaluated it with (`eval_protocol` in its config.json), else
the dataset's default (as scripts/evaluate_cps.py); --mode/--crop_size/--stride override it, and the
script prints which one each model uses. A mistake in the arguments is one line `error: ...` on
stderr and exit status 2 (`--debug`: traceback).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from cps_hf.cli import ArgumentParser, run_cli
from cps_hf.errors import UserInputError
from cps_hf.inference import (add_protocol_arguments, check_model_source, describe_protocol_choice,
                              load_eval_split, load_segmentation_model, model_eval_protocol, predict_logits,
                              protocol_for_model)

TRAINING_KEYS = ("loss", "loss_sup", "loss_cps", "lr")
# What each agreement key of the trainer (cps_hf.methods) measures; plain "agreement" is older logs' name.
AGREEMENT_LABELS = {
    "agreement_u": "unlabeled images",
    "agreement_u_fg": "unlabeled images, foreground",
    "agreement_l": "labeled images",
    "agreement_l_fg": "labeled images, foreground",
    "agreement": "all images",
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--output_dir", required=True, help="where the PNG figures go")
    parser.add_argument("--log", help="a trainer log.jsonl (or the run folder holding it)")
    parser.add_argument("--models", nargs="+", help="model folders or Hub ids, one grid column each")
    parser.add_argument("--titles", nargs="+", help="column titles for --models (default: folder names)")
    parser.add_argument("--dataset", choices=["voc", "cityscapes", "folder"], help="with --models: layout of --data_root")
    parser.add_argument("--data_root", help="with --models: dataset root folder")
    parser.add_argument("--split", default="val", help="with --models: split the images come from")
    parser.add_argument("--num_images", type=int, default=4, help="with --models: grid rows (the split's first images)")
    parser.add_argument("--ids", nargs="+", help="pick these sample ids instead of the first --num_images")
    parser.add_argument("--cell_size", type=int, nargs=2, metavar=("WIDTH", "HEIGHT"), help="default: first image's")
    add_protocol_arguments(parser, "the dataset's (as scripts/evaluate_cps.py)")
    args = parser.parse_args(argv)
    if not args.log and not args.models:
        parser.error("nothing to draw: give --log and/or --models")
    if args.models and (not args.dataset or not args.data_root):
        parser.error("--models needs --dataset and --data_root")
    if args.titles and args.models and len(args.titles) != len(args.models):
        parser.error(f"{len(args.titles)} --titles for {len(args.models)} --models")
    return args


def _base_name(key: str) -> str:
    return key.rsplit("/", 1)[-1]


def logged_keys(numeric: set[str], names) -> list[str]:
    """The logged numeric keys called one of `names`, bare or with a tracker prefix ("train/loss"), in `names` order."""
    return [key for name in names for key in sorted(numeric) if _base_name(key) == name]


def agreement_keys(numeric: set[str]) -> list[str]:
    """Every agreement key in the log (known ones first, in AGREEMENT_LABELS order): whatever the method logged."""
    found = [key for key in numeric if _base_name(key).startswith("agreement")]
    order = list(AGREEMENT_LABELS)
    return sorted(found, key=lambda k: (order.index(_base_name(k)) if _base_name(k) in order else len(order), k))


def _ylabel(key: str) -> str:
    """What a training panel's y axis shows."""
    name = _base_name(key)
    return "loss" if name.startswith("loss") else {"lr": "learning rate"}.get(name, name)


def _agreement_label(key: str) -> str:
    meaning = AGREEMENT_LABELS.get(_base_name(key))
    return f"{key}: {meaning}" if meaning else key


def curve_figures(log_path: str, output_dir: Path) -> list[Path]:
    from cps_hf.visualize import numeric_keys, plot_curves, plot_lines, read_log, split_runs

    path = Path(log_path)
    path = path / "log.jsonl" if path.is_dir() else path
    if not path.is_file():
        raise UserInputError(f"--log {log_path}: no such file (give a trainer log.jsonl or the run folder holding it)")
    try:
        records = read_log(path)
    except ValueError as err:
        raise UserInputError(f"--log {err}") from None
    runs = split_runs(records)
    if len(runs) > 1:
        first_line = len(records) - len(runs[-1]) + 1
        print(f"warning: {path} holds {len(runs)} runs (the step goes back {len(runs) - 1} time(s): several runs "
              f"wrote to this file, one after another or at once); drawing only the last, from record {first_line} "
              "on. Give each run its own --output_dir.", flush=True)
        records = runs[-1]
    numeric = numeric_keys(records)
    written = []
    training = logged_keys(numeric, TRAINING_KEYS)
    if training:
        written.append(plot_curves(records, training, output_dir / "training_curves.png", title="Training",
                                   ylabels={key: _ylabel(key) for key in training}))
    else:
        print(f"{path}: no values for training_curves.png ({', '.join(TRAINING_KEYS)})")
    agreement = agreement_keys(numeric)
    if agreement:
        labels = {key: _agreement_label(key) for key in agreement}
        written.append(plot_lines(records, agreement, output_dir / "agreement.png", labels=labels,
                                  title="Agreement of the two networks (Figure 7)",
                                  ylabel="fraction of pixels where the argmax agree"))
    else:
        print(f"{path}: no values for agreement.png ({', '.join(AGREEMENT_LABELS)})")
    ratios = sorted(key for key in numeric if "share_ratio/" in key)
    if ratios:  # the erasure alarm's view: a class near 0 is vanishing from the pseudo labels
        written.append(plot_lines(records, ratios, output_dir / "class_shares.png",
                                  labels={key: key.split("share_ratio/", 1)[1] for key in ratios},
                                  title="Each class's share of the pseudo labels over its share of the labels",
                                  ylabel="pseudo-label share / labeled share (1: kept)"))
    evaluation = logged_keys(numeric, ["eval_mean_iou"])
    if evaluation:
        written.append(plot_curves(records, evaluation, output_dir / "eval_mean_iou.png", title="Validation mIoU",
                                   ylabels={key: "mean IoU (0-1)" for key in evaluation}))
    else:
        print(f"{path}: no values for eval_mean_iou.png (eval_mean_iou)")
    if not written:
        raise UserInputError(f"--log {log_path}: none of the known keys were logged in {path}")
    return written


def _select(split, ids, num_images, split_name: str = "chosen"):
    if ids:
        positions = {sample_id: index for index, sample_id in enumerate(split["id"])}
        unknown = [i for i in ids if i not in positions]
        if unknown:
            raise UserInputError(f"--ids {' '.join(unknown)}: not in the {split_name} split")
        return [positions[i] for i in ids]
    return list(range(min(num_images, len(split))))


def comparison_figure(args, output_dir: Path) -> Path:
    import torch

    from cps_hf.data import EvalTransform, class_spec_of
    from cps_hf.visualize import comparison_grid, denormalize

    loaded, protocols = [], []
    for name in args.models:
        model, mean, std = load_segmentation_model(name, flag="--models")
        protocol, source = protocol_for_model(args.dataset, name, model_eval_protocol(model.config), args.mode,
                                              args.crop_size, args.stride, args.scales, args.flip)
        print(f"{name}: protocol {describe_protocol_choice(protocol, source)}")
        loaded.append((model, mean, std))
        protocols.append(protocol)
    split = load_eval_split(args.dataset, args.data_root, args.split)
    chosen = _select(split, args.ids, args.num_images, args.split)
    spec = class_spec_of(split)
    palette = spec.palette if spec is not None and spec.palette else ("cityscapes" if args.dataset == "cityscapes" else "voc")
    rows = []
    for index in chosen:
        item = split[index]
        row = None
        for (model, mean, std), protocol in zip(loaded, protocols):
            sample = EvalTransform(mean=mean, std=std)(item)
            if row is None:
                row = [denormalize(sample["pixel_values"], mean, std), sample["labels"]]
            with torch.no_grad():
                logits = predict_logits(model, sample["pixel_values"][None], num_labels=model.config.num_labels,
                                        **protocol)
            row.append(logits.argmax(1)[0])
        rows.append(row)
    titles = ["Image", "Ground truth"] + (args.titles or [Path(name).name for name in args.models])
    cell_size = tuple(args.cell_size) if args.cell_size else None
    grid = comparison_grid(rows, titles=titles, palette=palette, cell_size=cell_size,
                           class_names=loaded[0][0].config.id2label)
    path = output_dir / "comparison.png"
    grid.save(path)
    return path


def main(argv=None) -> list[Path]:
    args = parse_args(argv)
    for name in args.models or []:
        check_model_source(name, "--models")  # every name checked before the data and the first model load
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    written = []
    if args.models:
        written.append(comparison_figure(args, output_dir))
    if args.log:
        written += curve_figures(args.log, output_dir)
    for path in written:
        print(f"wrote {path}")
    return written


if __name__ == "__main__":
    sys.exit(run_cli(main))
