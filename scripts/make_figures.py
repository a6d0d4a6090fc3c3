#!/usr/bin/env python
"""Figures like the paper's: the qualitative grid (Figure 6) and training / agreement curves (Figure 7).

    # input | ground truth | supervised | CPS, for the first 4 validation images
    python scripts/make_figures.py --models outputs/sup/model outputs/cps/model --titles Supervised CPS \
        --dataset voc --data_root data/VOC --split val --num_images 4 --output_dir figures
    # curves from the trainer's log (one JSON object per logged step)
    python scripts/make_figures.py --log outputs/cps/log.jsonl --output_dir figures

Writes comparison.png, training_curves.png (loss, loss_sup, loss_cps, lr: those present),
agreement.png (the fraction of pixels where the two branches' argmax agree) and eval_mean_iou.png.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

TRAINING_KEYS = ("loss", "loss_sup", "loss_cps", "lr")


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--log", help="a trainer log.jsonl (or the run folder holding it)")
    parser.add_argument("--models", nargs="+", help="model folders or Hub ids, one grid column each")
    parser.add_argument("--titles", nargs="+", help="column titles for --models (default: folder names)")
    parser.add_argument("--dataset", choices=["voc", "cityscapes", "folder"])
    parser.add_argument("--data_root")
    parser.add_argument("--split", default="val")
    parser.add_argument("--num_images", type=int, default=4)
    parser.add_argument("--ids", nargs="+", help="pick these sample ids instead of the first --num_images")
    parser.add_argument("--cell_size", type=int, nargs=2, metavar=("WIDTH", "HEIGHT"), help="default: first image's")
    parser.add_argument("--mode", choices=["whole", "slide"])
    parser.add_argument("--crop_size", type=int)
    parser.add_argument("--stride", type=int)
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0])
    parser.add_argument("--flip", action="store_true")
    args = parser.parse_args(argv)
    if not args.log and not args.models:
        parser.error("nothing to draw: give --log and/or --models")
    if args.models and (not args.dataset or not args.data_root):
        parser.error("--models needs --dataset and --data_root")
    if args.titles and args.models and len(args.titles) != len(args.models):
        parser.error(f"{len(args.titles)} --titles for {len(args.models)} --models")
    return args


def curve_figures(log_path: str, output_dir: Path) -> list[Path]:
    from cps_hf.visualize import plot_curves, read_log

    path = Path(log_path)
    records = read_log(path / "log.jsonl" if path.is_dir() else path)
    present = lambda keys: [k for k in keys if any(isinstance(r.get(k), (int, float)) for r in records)]  # noqa: E731
    written = []
    for name, keys, title in [
        ("training_curves.png", present(TRAINING_KEYS), "Training"),
        ("agreement.png", present(["agreement"]), "Agreement of the two branches (Figure 7)"),
        ("eval_mean_iou.png", present(["eval_mean_iou"]), "Validation mIoU"),
    ]:
        if keys:
            written.append(plot_curves(records, keys, output_dir / name, title=title))
        else:
            print(f"{path}: no values for {name} ({', '.join(TRAINING_KEYS) if name.startswith('training') else name[:-4]})")
    if not written:
        raise SystemExit(f"{path}: none of the known keys were logged")
    return written


def _select(split, ids, num_images):
    if ids:
        positions = {sample_id: index for index, sample_id in enumerate(split["id"])}
        unknown = [i for i in ids if i not in positions]
        if unknown:
            raise SystemExit(f"--ids not in the split: {unknown}")
        return [positions[i] for i in ids]
    return list(range(min(num_images, len(split))))


def comparison_figure(args, output_dir: Path) -> Path:
    import torch

    from cps_hf.data import EvalTransform, class_spec_of
    from cps_hf.inference import load_eval_split, load_segmentation_model, predict_logits, resolve_protocol
    from cps_hf.visualize import comparison_grid, denormalize

    protocol = resolve_protocol(args.dataset, args.mode, args.crop_size, args.stride, args.scales, args.flip)
    loaded = [load_segmentation_model(name) for name in args.models]
    split = load_eval_split(args.dataset, args.data_root, args.split)
    spec = class_spec_of(split)
    palette = spec.palette if spec is not None and spec.palette else ("cityscapes" if args.dataset == "cityscapes" else "voc")
    rows = []
    for index in _select(split, args.ids, args.num_images):
        item = split[index]
        row = None
        for model, mean, std in loaded:
            sample = EvalTransform(mean=mean, std=std)(item)
            if row is None:
                row = [denormalize(sample["pixel_values"], mean, std), sample["labels"]]
            with torch.no_grad():
                logits = predict_logits(model, sample["pixel_values"][None], num_labels=model.config.num_labels,
                                        **protocol)
            row.append(logits.argmax(1)[0])
        rows.append(row)
    titles = ["Image", "Ground truth"] + (args.titles or [Path(name).name for name in args.models])
    grid = comparison_grid(rows, titles=titles, palette=palette, cell_size=tuple(args.cell_size) if args.cell_size else None)
    path = output_dir / "comparison.png"
    grid.save(path)
    return path


def main(argv=None) -> list[Path]:
    args = parse_args(argv)
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
    main(sys.argv[1:])
