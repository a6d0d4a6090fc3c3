"""How much a CPS training step costs beyond the network passes it needs.

For `cps` and `cps_cutmix` this times, in the same process and on the same networks:

- the full training step: batch hand-off (a dict of tensors already on the device), the method
  call (forwards, losses, pseudo labels, CutMix), backward, optimizer and scheduler step,
  zero_grad, and turning the logs into floats;
- each network pass that step needs, separately: forward+backward of each network on each of its
  batches, plus (CutMix) the no-grad forwards that make the pseudo labels. The backward of a
  pass starts from a prepared gradient, so no loss is computed there.

The method is built as the trainer builds it by default (class names, the erasure alarm's per-class
shares logged every step).

step_over_passes is the median over repeats of step / (sum of that repeat's passes); the JSON
also gives the ratio of the medians and of the minima, and on CPU the same median in process CPU
time (`cpu_step_over_passes`), which another job on a shared machine stretches less than wall time.
Everything the step adds to the networks' own work (losses, argmax, mixing, optimizer, logging) is
overhead; the goal is <= 1.10.

    python benchmarks/step_efficiency.py --quick     # < 1 min on 2 CPU cores (1 torch thread)
    python benchmarks/step_efficiency.py --crop 512 --batch 8 --device cuda

The last line of output is one JSON object with `step_over_passes` per method and their max.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from cps_hf import CPSConfig, CPSForSemanticSegmentation
from cps_hf.losses import cross_entropy
from cps_hf.methods import build_method
from cps_hf.optim import build_optimizer, poly_schedule

GOAL = 1.10
CPS_WEIGHTS = {"cps": 1.5, "cps_cutmix": 1.0}  # the original's VOC values


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small crop and few repeats: under a minute on 2 cores")
    parser.add_argument("--methods", nargs="+", default=["cps", "cps_cutmix"], choices=["cps", "cps_cutmix"])
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--num_labels", type=int, default=21)
    parser.add_argument("--crop", type=int, default=None, help="square crop size (default 192, quick 128)")
    parser.add_argument("--batch", type=int, default=None, help="labeled = unlabeled batch size (default 2)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (default 9, quick 5)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed repeats first (default 2, quick 1)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for torch (default: 1 with --quick, which is steadier on a shared machine; "
        "torch's own default otherwise)",
    )
    args = parser.parse_args(argv)
    args.threads = args.threads or (1 if args.quick else None)
    args.crop = args.crop or (128 if args.quick else 192)
    args.batch = args.batch or 2
    args.repeats = args.repeats or (5 if args.quick else 9)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    return args


def class_names(args) -> list[str]:
    return [f"class_{i}" for i in range(args.num_labels)]


def build_models(args) -> list[CPSForSemanticSegmentation]:
    labels = class_names(args)
    config = CPSConfig(
        backbone=args.backbone,
        num_labels=args.num_labels,
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
    )
    torch.manual_seed(0)
    return [CPSForSemanticSegmentation(config).to(args.device).train() for _ in range(2)]


def prepared_batch(args, num_unlabeled_streams: int) -> dict:
    shape = (args.batch, 3, args.crop, args.crop)
    g = torch.Generator().manual_seed(0)
    return {
        "labeled": {
            "pixel_values": torch.randn(shape, generator=g).to(args.device),
            "labels": torch.randint(0, args.num_labels, (args.batch, args.crop, args.crop), generator=g).to(
                args.device
            ),
        },
        "unlabeled": [
            {"pixel_values": torch.randn(shape, generator=g).to(args.device)} for _ in range(num_unlabeled_streams)
        ],
    }


def hand_off(batch: dict, device) -> dict:
    """What the loop does with a collated batch: move it to the device (a no-op when it is there)."""
    return {
        "labeled": {k: v.to(device, non_blocking=True) for k, v in batch["labeled"].items()},
        "unlabeled": [{k: v.to(device, non_blocking=True) for k, v in s.items()} for s in batch["unlabeled"]],
    }


def make_training_step(method, models, optimizer, scheduler, batch, device):
    state = {"step": 0}

    def training_step():
        output = method(models, hand_off(batch, device), state["step"])
        output.loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        logs = {**output.logs, "lr": scheduler.get_last_lr()[0]}
        state["step"] += 1
        return logs

    return training_step


def make_passes(method_name: str, models, batch) -> dict[str, callable]:
    """The network passes one step of `method_name` runs, each as a separately timed callable."""
    x_l = batch["labeled"]["pixel_values"]
    unlabeled = [s["pixel_values"] for s in batch["unlabeled"]]

    def forward_backward(model, x):
        def run():
            logits = model(pixel_values=x).logits
            logits.backward(torch.ones_like(logits))

        return run

    def forward_no_grad(model, x):
        def run():
            with torch.no_grad():
                model(pixel_values=x)

        return run

    passes = {}
    for k, model in enumerate(models, start=1):
        if method_name == "cps":
            passes[f"net{k} labeled fwd+bwd"] = forward_backward(model, x_l)
            passes[f"net{k} unlabeled fwd+bwd"] = forward_backward(model, unlabeled[0])
        else:
            mixed = unlabeled[0].clone()  # same shape and cost as the CutMixed batch
            passes[f"net{k} u0 no-grad fwd"] = forward_no_grad(model, unlabeled[0])
            passes[f"net{k} u1 no-grad fwd"] = forward_no_grad(model, unlabeled[1])
            passes[f"net{k} mixed fwd+bwd"] = forward_backward(model, mixed)
            passes[f"net{k} labeled fwd+bwd"] = forward_backward(model, x_l)
    return passes


def timed_with_cpu(fn, device) -> tuple[float, float]:
    """Wall and process CPU seconds of one call."""
    cpu = time.process_time()
    wall = timed(fn, device)
    return wall, time.process_time() - cpu


def timed(fn, device) -> float:
    synchronize(device)
    start = time.perf_counter()
    fn()
    synchronize(device)
    return time.perf_counter() - start


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def measure(method_name: str, args) -> dict:
    models = build_models(args)
    method = build_method(method_name, cross_entropy, cps_weight=CPS_WEIGHTS[method_name],
                          class_names=class_names(args), class_shares=True)
    optimizer = build_optimizer(models, lr=0.0025, weight_decay=4e-4)
    total_steps = 10 * (args.warmup + args.repeats)
    scheduler = poly_schedule(optimizer, total_steps=total_steps)
    batch = prepared_batch(args, method.num_unlabeled_streams)
    training_step = make_training_step(method, models, optimizer, scheduler, batch, args.device)
    passes = make_passes(method_name, models, batch)

    step_times, pass_times = [], {name: [] for name in passes}  # (wall, cpu) seconds
    for repeat in range(args.warmup + args.repeats):
        # Alternate which comes first so slow drift (other processes, clocks) hits both alike.
        if repeat % 2:
            times = {name: timed_with_cpu(run, args.device) for name, run in passes.items()}
            optimizer.zero_grad(set_to_none=True)  # the passes' gradients are not used
            step_time = timed_with_cpu(training_step, args.device)
        else:
            step_time = timed_with_cpu(training_step, args.device)
            times = {name: timed_with_cpu(run, args.device) for name, run in passes.items()}
            optimizer.zero_grad(set_to_none=True)
        if repeat >= args.warmup:
            step_times.append(step_time)
            for name, t in times.items():
                pass_times[name].append(t)

    passes_per_repeat = [tuple(map(sum, zip(*ts))) for ts in zip(*pass_times.values())]
    paired_ratios = [step[0] / passes_sum[0] for step, passes_sum in zip(step_times, passes_per_repeat)]
    cpu_ratios = [step[1] / passes_sum[1] for step, passes_sum in zip(step_times, passes_per_repeat)]
    step_walls, pass_walls = [t[0] for t in step_times], [t[0] for t in passes_per_repeat]
    step, passes_total = statistics.median(step_walls), statistics.median(pass_walls)
    return {
        "step_s": step,
        "passes_s": passes_total,
        "per_pass_s": {name: statistics.median(t[0] for t in ts) for name, ts in pass_times.items()},
        # Median of the per-repeat ratios: each ratio compares a step with the passes timed right
        # next to it, which keeps it stable on a shared, noisy machine.
        "step_over_passes": statistics.median(paired_ratios),
        "ratio_of_medians": step / passes_total,
        "ratio_of_mins": min(step_walls) / min(pass_walls),
        "cpu_step_over_passes": statistics.median(cpu_ratios),
    }


def main(argv=None):
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {}
    for name in args.methods:
        results[name] = measure(name, args)
        r = results[name]
        print(
            f"{name:>10}: step {r['step_s'] * 1e3:8.1f} ms | passes {r['passes_s'] * 1e3:8.1f} ms "
            f"| step/passes {r['step_over_passes']:.3f} (CPU time {r['cpu_step_over_passes']:.3f})",
            flush=True,
        )
    ratios = {name: round(r["step_over_passes"], 4) for name, r in results.items()}
    ratios["max"] = max(ratios.values())
    summary = {
        "benchmark": "step_efficiency",
        "step_over_passes": ratios,
        "goal": GOAL,
        "meets_goal": ratios["max"] <= GOAL,
        "step_ms": {name: round(r["step_s"] * 1e3, 2) for name, r in results.items()},
        "passes_ms": {name: round(r["passes_s"] * 1e3, 2) for name, r in results.items()},
        "ratio_of_medians": {name: round(r["ratio_of_medians"], 4) for name, r in results.items()},
        "ratio_of_mins": {name: round(r["ratio_of_mins"], 4) for name, r in results.items()},
        **({"cpu_step_over_passes": {name: round(r["cpu_step_over_passes"], 4) for name, r in results.items()}}
           if torch.device(args.device).type == "cpu" else {}),
        "device": str(args.device),
        "torch_threads": torch.get_num_threads(),
        "backbone": args.backbone,
        "crop": args.crop,
        "batch": args.batch,
        "repeats": args.repeats,
        "warmup": args.warmup,
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
