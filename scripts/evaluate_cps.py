#!/usr/bin/env python
"""Evaluate a segmentation model on a labelled split under the paper's inference protocols.

    python scripts/evaluate_cps.py --model outputs/voc_cps/model --dataset voc --data_root data/VOC --split val
    python scripts/evaluate_cps.py --model user/cps-cityscapes --dataset cityscapes --data_root data/cityscapes \
        --mode slide --crop_size 800 --stride 534 --scales 0.75 1.0 1.25 --flip --output results.json

The default protocol is the one the trainer evaluated the model with (`eval_protocol` in its
config.json), so the same model gives the trainer's numbers. Models without one (older exports,
other models) get the original code's: VOC whole image padded to 512; Cityscapes 800x800 windows
with stride 534. --mode/--crop_size/--stride override either; single scale, no flip, one branch.

Networks: by default the one network --model holds (network 1 of a CPS run, what the paper
evaluates), printed as "network 1 only". An ensemble averages the SOFTMAX probabilities of all a
run's networks ("ensemble of N networks (softmax mean)"):

    python scripts/evaluate_cps.py --model outputs/voc_cps/model --ensemble_checkpoint outputs/voc_cps/step_3000 ...
    python scripts/evaluate_cps.py --models runA/model runB/model runC/model ...
    python scripts/evaluate_cps.py --model outputs/voc_cps/model_ensemble ...   # an exported ensemble

`--ensemble_checkpoint` loads every network of an accelerate checkpoint folder (model.safetensors,
model_1.safetensors, ...; a mean teacher's teacher too) into copies of --model's architecture.
`--model2 DIR --both_branches` (older) averages the LOGITS of two folders instead. Prints a per-class
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

from cps_hf.cli import ArgumentParser, run_cli
from cps_hf.errors import UserInputError
from cps_hf.failures import collapsed_prediction
from cps_hf.inference import (TransformedDataset, add_protocol_arguments, check_model_source,
                              describe_protocol_choice, evaluate_model, load_checkpoint_networks, load_eval_split,
                              load_segmentation_model, model_eval_protocol, protocol_for_model)
from cps_hf.metrics import MeanIoU


def parse_args(argv=None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--model", help="model folder or Hub id (a transformers segmentation model); alone: that "
                        "one network (network 1 of a CPS run, the paper's evaluation); with --ensemble_checkpoint: "
                        "the architecture, image statistics and protocol of the checkpoint's networks")
    parser.add_argument("--ensemble_checkpoint", metavar="STEP_DIR",
                        help="a run's accelerate checkpoint folder (step_N): every network in it (model.safetensors, "
                        "model_1.safetensors, ...; a mean teacher's teacher too), loaded into copies of --model, "
                        "evaluated as one ensemble that averages their softmax probabilities")
    parser.add_argument("--models", nargs="+", metavar="MODEL",
                        help="several model folders or Hub ids (instead of --model) evaluated as one ensemble that "
                        "averages their softmax probabilities; the first gives the protocol and image statistics")
    parser.add_argument("--model2", help="the second CPS branch (folder or Hub id), used with --both_branches")
    parser.add_argument("--both_branches", action="store_true",
                        help="average the LOGITS (not the softmax) of --model and --model2, as the original code "
                        "would; --models/--ensemble_checkpoint average softmax probabilities")
    parser.add_argument("--dataset", required=True, choices=["voc", "cityscapes", "folder"], help="layout of --data_root")
    parser.add_argument("--data_root", required=True, help="dataset root folder")
    parser.add_argument("--split", default="val", help="split to evaluate")
    add_protocol_arguments(parser, "the dataset's: voc whole image padded to 512, cityscapes 800 px windows "
                           "with stride 534, folder whole image")
    parser.add_argument("--batch_size", type=int, default=1, help="images per forward pass (same-size images)")
    parser.add_argument("--num_workers", type=int, default=0, help="DataLoader workers decoding images")
    parser.add_argument("--max_samples", type=int, help="evaluate only the first N images (quick checks); default: all")
    parser.add_argument("--output", help="also write the results as JSON here; default: print only")
    parser.add_argument(
        "--metric", default="cps_hf",
        help="cps_hf (streaming MeanIoU, default), or an evaluate metric name or path with mean_iou's interface, "
        "e.g. mean_iou (evaluate's own, from the Hub) to cross-check; single process only",
    )
    args = parser.parse_args(argv)
    if args.models and args.model:
        parser.error("give --model or --models, not both (--models lists every network of the ensemble)")
    if not args.models and not args.model:
        parser.error("the following arguments are required: --model (or --models)")
    ensembles = [flag for flag, given in (("--ensemble_checkpoint", args.ensemble_checkpoint),
                                          ("--models", args.models), ("--both_branches", args.both_branches)) if given]
    if len(ensembles) > 1:
        parser.error(f"{' and '.join(ensembles)} are alternatives: give one")
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


def load_networks(args, model, mean, std, device) -> tuple[list, str, str]:
    """(models, how evaluate_model combines them, the line to print) for the networks the flags ask for."""
    if args.ensemble_checkpoint:
        models = load_checkpoint_networks(args.ensemble_checkpoint, model, device)
    elif args.models:
        models = [model]
        for name in args.models[1:]:
            other, other_mean, other_std = load_segmentation_model(name, device, flag="--models")
            if other.config.num_labels != model.config.num_labels:
                raise UserInputError(f"--models: {args.models[0]} has {model.config.num_labels} classes but {name} "
                                     f"{other.config.num_labels}")
            if (tuple(other_mean), tuple(other_std)) != (tuple(mean), tuple(std)):
                raise UserInputError(f"--models: {name} normalises images with mean {other_mean} std {other_std}, "
                                     f"{args.models[0]} with {mean} {std}: an ensemble needs one input")
            models.append(other)
    elif args.both_branches:
        other = load_segmentation_model(args.model2, device, flag="--model2")[0]
        if other.config.num_labels != model.config.num_labels:
            raise UserInputError(f"--model has {model.config.num_labels} classes but --model2 "
                                 f"{other.config.num_labels}")
        return [model, other], "logits", "networks: --model and --model2 (logit mean, --both_branches)"
    else:
        exported = getattr(model.config, "ensemble_size", None)  # an exported CPSEnsembleForSemanticSegmentation
        if exported is not None:
            return [model], "logits", f"networks: ensemble of {exported} networks (softmax mean, exported ensemble)"
        return [model], "logits", "networks: network 1 only"
    return models, "softmax", f"networks: ensemble of {len(models)} networks (softmax mean)"


def main(argv=None) -> dict:
    args = parse_args(argv)
    for flag, names in (("--model", [args.model]), ("--models", args.models or []), ("--model2", [args.model2])):
        for name in names:
            if name:
                check_model_source(name, flag)  # before accelerate starts and the model and data load
    if args.ensemble_checkpoint and not Path(args.ensemble_checkpoint).expanduser().is_dir():
        raise UserInputError(f"--ensemble_checkpoint {args.ensemble_checkpoint}: folder does not exist "
                             "(give a run's step_N checkpoint folder)")
    args.model = args.model or args.models[0]
    from accelerate import Accelerator

    from cps_hf.data import EvalTransform, class_spec_of

    split = load_eval_split(args.dataset, args.data_root, args.split)
    accelerator = Accelerator()
    model, mean, std = load_segmentation_model(args.model, accelerator.device,
                                               flag="--models" if args.models else "--model")
    protocol, protocol_source = protocol_from_args(args, model_eval_protocol(model.config))
    models, average, networks_line = load_networks(args, model, mean, std, accelerator.device)
    if accelerator.is_main_process:
        print(f"protocol: {describe_protocol_choice(protocol, protocol_source)}")
        print(networks_line)
    num_labels = model.config.num_labels

    spec = class_spec_of(split)
    class_names = list(spec.names) if spec is not None else [model.config.id2label[i] for i in range(num_labels)]
    if len(class_names) != num_labels:
        raise UserInputError(f"--data_root {args.data_root} ({args.dataset}) has {len(class_names)} classes but "
                             f"--model {args.model} predicts {num_labels}")
    if args.max_samples is not None:
        split = split.select(range(min(args.max_samples, len(split))))
    data = TransformedDataset(split, EvalTransform(mean=mean, std=std, num_classes=num_labels))

    metric = MeanIoU(num_labels, ignore_index=255, device=accelerator.device)  # its matrix shows a collapse
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
        batch_size=args.batch_size, num_workers=args.num_workers, progress=True, metric=metric, average=average,
        **protocol,
    )
    summary = {f"eval_{key}": _plain(value) for key, value in results.items()}
    collapse = collapsed_prediction(metric.confusion_matrix, class_names) if isinstance(metric, MeanIoU) else None
    if collapse:
        summary["collapse_warning"] = collapse
    summary.update({
        "class_names": class_names,
        "model": args.model,
        "model2": args.model2,
        "models": args.models,
        "ensemble_checkpoint": args.ensemble_checkpoint,
        "networks": networks_line.split(": ", 1)[1],
        "average": average if len(models) > 1 else None,
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
        if collapse:
            print(f"warning: {collapse}")
        if args.output:
            Path(args.output).parent.mkdir(parents=True, exist_ok=True)
            Path(args.output).write_text(json.dumps(summary, indent=2) + "\n")
    return summary


if __name__ == "__main__":
    sys.exit(run_cli(main))
