#!/usr/bin/env python
"""Evaluate a segmentation model on a labelled split under the paper's inference protocols.

    python scripts/evaluate_cps.py --model outputs/voc_cps/model --dataset voc --data_root data/VOC --split val
    python scripts/evaluate_cps.py --model user/cps-cityscapes --dataset cityscapes --data_root data/cityscapes \
        --mode slide --crop_size 800 --stride 534 --scales 0.75 1.0 1.25 --flip --output results.json

The default protocol is the one the trainer evaluated the model with (`eval_protocol` in its
config.json), so the same model gives the trainer's numbers. Models without one (older exports,
other models) get the original code's: VOC whole image padded to 512; Cityscapes 800x800 windows
with stride 534. --mode/--crop_size/--stride override either; single scale, no flip, one branch.
`--model2 DIR --both_branches` averages the logits of the two CPS branches. Prints a per-class
table and writes evaluate-style keys with the `eval_` prefix (as the trainer's all_results.json).
Runs under `accelerate launch` too: each process takes a disjoint share of the images and the
confusion matrices are summed. A mistake in the arguments (a model folder or data root that does
not exist, an unknown split) is one line `error: ...` on stderr and exit status 2 (`--debug`: traceback).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

from cps_hf.cli import run_cli
from cps_hf.errors import UserInputError
from cps_hf.inference import (TransformedDataset, add_protocol_arguments, check_model_source,
                              describe_protocol_choice, evaluate_model, load_eval_split, load_segmentation_model,
                              model_eval_protocol, protocol_for_model)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model folder or Hub id (a transformers segmentation model)")
    parser.add_argument("--model2", help="the second CPS branch (folder or Hub id), used with --both_branches")
    parser.add_argument("--both_branches", action="store_true", help="average the logits of --model and --model2")
    parser.add_argument("--dataset", required=True, choices=["voc", "cityscapes", "folder"])
    parser.add_argument("--data_root", required=True)
    parser.add_argument("--split", default="val")
    add_protocol_arguments(parser, "the dataset's: voc whole image padded to 512, cityscapes 800 px windows "
                           "with stride 534, folder whole image")
    parser.add_argument("--batch_size", type=int, default=1)
    parser.add_argument("--num_workers", type=int, default=0)
    parser.add_argument("--max_samples", type=int, help="evaluate only the first N images (quick checks)")
    parser.add_argument("--output", help="write the results as JSON here")
    parser.add_argument(
        "--metric", default="cps_hf",
        help="cps_hf (streaming MeanIoU, default), or an evaluate metric name or path with mean_iou's interface, "
        "e.g. mean_iou (evaluate's own, from the Hub) to cross-check; single process only",
    )
    args = parser.parse_args(argv)
    if args.both_branches and not args.model2:
        parser.error("--both_branches needs --model2 (the second branch's folder or Hub id)")
    if args.model2 and not args.both_branches:
        parser.error("--model2 is only used with --both_branches")
    if args.batch_size > 1 and args.dataset == "voc":
        raise UserInputError(f"--batch_size {args.batch_size}: VOC images differ in size, use --batch_size 1")
    return args


def protocol_from_args(args, model_protocol: dict | None = None) -> tuple[dict, str]:
    """(protocol, where it came from): the model's recorded eval_protocol, else the dataset's default,
    with any --mode/--crop_size/--stride given on top."""
    return protocol_for_model(args.dataset, args.model, model_protocol, args.mode, args.crop_size, args.stride,
                              args.scales, args.flip)


def _plain(value):
    """JSON-safe: arrays to lists, NaN to null."""
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, (float, np.floating)):
        return None if math.isnan(value) else float(value)
    return value


def format_table(results: dict, class_names: list[str]) -> str:
    width = max(12, *(len(name) for name in class_names))
    lines = [f"{'class':<{width}}  {'IoU':>6}  {'Acc':>6}"]
    for name, iou, acc in zip(class_names, results["per_category_iou"], results["per_category_accuracy"]):
        cells = ["   n/a" if math.isnan(v) else f"{100 * v:6.2f}" for v in (iou, acc)]
        lines.append(f"{name:<{width}}  {cells[0]}  {cells[1]}")
    lines.append(f"{'mIoU':<{width}}  {100 * results['mean_iou']:6.2f}")
    lines.append(f"{'mAcc':<{width}}  {100 * results['mean_accuracy']:6.2f}")
    lines.append(f"{'aAcc':<{width}}  {100 * results['overall_accuracy']:6.2f}")
    return "\n".join(lines)


def main(argv=None) -> dict:
    args = parse_args(argv)
    for flag, name in (("--model", args.model), ("--model2", args.model2)):
        if name:
            check_model_source(name, flag)  # before accelerate starts and the model and data load
    from accelerate import Accelerator

    from cps_hf.data import EvalTransform, class_spec_of

    split = load_eval_split(args.dataset, args.data_root, args.split)
    accelerator = Accelerator()
    model, mean, std = load_segmentation_model(args.model, accelerator.device)
    protocol, protocol_source = protocol_from_args(args, model_eval_protocol(model.config))
    if accelerator.is_main_process:
        print(f"protocol: {describe_protocol_choice(protocol, protocol_source)}")
    models = [model]
    if args.both_branches:
        models.append(load_segmentation_model(args.model2, accelerator.device, flag="--model2")[0])
        if models[1].config.num_labels != model.config.num_labels:
            raise UserInputError(f"--model has {model.config.num_labels} classes but --model2 "
                                 f"{models[1].config.num_labels}")
    num_labels = model.config.num_labels

    spec = class_spec_of(split)
    class_names = list(spec.names) if spec is not None else [model.config.id2label[i] for i in range(num_labels)]
    if len(class_names) != num_labels:
        raise UserInputError(f"--data_root {args.data_root} ({args.dataset}) has {len(class_names)} classes but "
                             f"--model {args.model} predicts {num_labels}")
    if args.max_samples is not None:
        split = split.select(range(min(args.max_samples, len(split))))
    data = TransformedDataset(split, EvalTransform(mean=mean, std=std, num_classes=num_labels))

    metric = None
    if args.metric != "cps_hf":
        from cps_hf.metrics import EvaluateModuleMeanIoU

        if accelerator.num_processes > 1:
            raise UserInputError(f"--metric {args.metric}: evaluate metrics run in a single process; drop --metric "
                                 "(cps_hf's MeanIoU sums across processes) or launch one process")
        try:
            metric = EvaluateModuleMeanIoU(args.metric, num_labels, ignore_index=255)
        except RuntimeError as err:  # unknown name, offline, broken module
            reason = str(err).strip().splitlines()[0]
            raise UserInputError(f"--metric {args.metric}: {reason}") from err
    results = evaluate_model(
        models, data, num_labels=num_labels, ignore_index=255, accelerator=accelerator,
        batch_size=args.batch_size, num_workers=args.num_workers, progress=True, metric=metric, **protocol,
    )
    summary = {f"eval_{key}": _plain(value) for key, value in results.items()}
    summary.update({
        "class_names": class_names,
        "model": args.model,
        "model2": args.model2,
        "dataset": args.dataset,
        "split": args.split,
        "num_samples": len(data),
        "metric": args.metric,
        "protocol": {**protocol, "scales": list(protocol["scales"]), "branches": len(models)},
        "protocol_source": protocol_source,
    })
    if accelerator.is_main_process:
        print(format_table(results, class_names))
        print(f"protocol: {summary['protocol']}; {len(data)} images")
        if args.output:
            Path(args.output).parent.mkdir(parents=True, exist_ok=True)
            Path(args.output).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    sys.exit(run_cli(main))
