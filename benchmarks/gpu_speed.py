"""Training-step speed and memory of the GPU precision settings, each as a ratio to fp32 in the same process.

For each case (a paper preset: CPS + CutMix on ResNet-50 at 512, UniMatch V2 on DINOv2-S + DPT at 518) and each
setting, this builds the networks, the method and the optimizer from the preset as scripts/train_cps.py does
(random weights), prepares them with accelerate as the trainer does, and times the trainer's step on one fixed
batch already on the device (method call, backward, optimizer, EMA update, scheduler, zero_grad): no data
loading, so the ratios are the step's own.

Settings:
- fp32: `--mixed_precision no`;
- bf16: `--mixed_precision bf16` (accelerate's autocast on the trained networks; the trainer gives an EMA teacher
  the same, see cps_hf.training.autocast_follower);
- bf16_channels_last: the same with every network in channels_last memory format (the trainer has no flag for
  it yet: this measures whether one is worth adding);
- bf16_compile: the same with accelerate's `dynamo_backend="inductor"`, what `accelerate launch --dynamo_backend
  inductor scripts/train_cps.py ...` does today: the trained networks compiled, an EMA teacher not. The warm-up
  steps include the compilation (minutes); only the steps after them are timed.

Per case and setting: images/s (labeled + unlabeled images per step over the median step time), peak GPU memory
(torch.cuda.max_memory_allocated over the timed steps), both as ratios to fp32, and the largest relative
difference of the step losses to fp32's over the same steps (same seed, same batch): what the setting does to
the numbers over a few steps; from random weights that catches a broken setting, not a drift, and where no teacher
pixel reaches a method's threshold (UniMatch V2's 0.95) it sees only the labeled loss: `pseudo_kept_u` says how
much of the teacher's labels each setting kept. The goal the issue names: >= 1.5x fp32's images/s at <= 0.6x its
memory.

    python benchmarks/gpu_speed.py                                   # on a GPU: both cases, all settings
    python benchmarks/gpu_speed.py --cases cps_cutmix_r50_512 --settings fp32 bf16
    python benchmarks/gpu_speed.py --quick --device cpu              # the code path in ~1 min; numbers mean nothing

The last line of output is one JSON object with every figure and the device that gave it.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import time
from pathlib import Path

import torch

from cps_hf.cli import run_cli
from cps_hf.optim import build_optimizer, poly_schedule
from cps_hf.training import autocast_follower, build_networks, method_from_args, model_config_from_args
from cps_hf.training_args import parse_args as parse_training_args

REPO = Path(__file__).resolve().parents[1]
# name -> (preset, quick-mode overrides: a small encoder and crop so the CPU runs the same code path)
CASES = {
    "cps_cutmix_r50_512": ("configs/voc_r50_1-8_cps_cutmix.yaml",
                           {"backbone": "resnet18", "crop_size": 64, "aspp_channels": 32, "decoder_channels": 32}),
    "unimatch_v2_dinov2s_518": ("configs/voc_dinov2s_1464_unimatch_v2.yaml",
                                {"backbone": "vit_small_patch14_dinov2", "crop_size": 56}),
}
SETTINGS = {
    "fp32": {"precision": "no", "channels_last": False, "compile": False},
    "bf16": {"precision": "bf16", "channels_last": False, "compile": False},
    "bf16_channels_last": {"precision": "bf16", "channels_last": True, "compile": False},
    "bf16_compile": {"precision": "bf16", "channels_last": False, "compile": True},
}
GOAL = {"images_per_second": 1.5, "memory": 0.6}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS),
                        help="fp32 always runs first (the baseline of every ratio)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, default=None,
                        help="labeled images per step, and as many per unlabeled stream (default: the preset's "
                             "global batch, 8 for the R50 preset and 16 for UniMatch V2's; quick 2)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps per setting (default 10, quick 1)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="untimed steps first (default 3, and 6 for bf16_compile; quick 1)")
    parser.add_argument("--quick", action="store_true",
                        help="small encoders and crops, one timed step: checks the code path, e.g. on a CPU")
    args = parser.parse_args(argv)
    args.settings = ["fp32"] + [s for s in args.settings if s != "fp32"]
    args.steps = args.steps or (1 if args.quick else 10)
    return args


def training_args_for(case: str, args):
    preset, quick = CASES[case]
    flags = ["--config", str(REPO / preset), "--pretrained_backbone", "none"]
    for key, value in (quick.items() if args.quick else ()):
        flags += [f"--{key}", str(value)]
    training = parse_training_args(flags)
    training.per_device_train_batch_size = args.batch or (2 if args.quick else training.global_batch_size)
    return training


def fixed_batch(training, num_unlabeled_streams: int, num_labels: int, device) -> dict:
    shape = (training.per_device_train_batch_size, 3, training.crop_size, training.crop_size)
    g = torch.Generator().manual_seed(0)
    return {
        "labeled": {"pixel_values": torch.randn(shape, generator=g).to(device),
                    "labels": torch.randint(0, num_labels, (shape[0], *shape[2:]), generator=g).to(device)},
        "unlabeled": [{"pixel_values": torch.randn(shape, generator=g).to(device)} for _ in range(num_unlabeled_streams)],
    }


def reset_accelerate() -> None:
    """accelerate keeps one process-wide state (its precision included): cleared before each setting and after
    the last, so one process can measure several precisions and leaves nothing behind."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    torch._dynamo.reset()


def fresh_accelerator(setting: dict, device: str):
    from accelerate import Accelerator

    reset_accelerate()
    return Accelerator(mixed_precision=setting["precision"], cpu=device == "cpu",
                       dynamo_backend="inductor" if setting["compile"] else "no")


def measure(case: str, setting_name: str, args) -> dict:
    setting = SETTINGS[setting_name]
    training = training_args_for(case, args)
    class_names = [f"class_{k}" for k in range(21)]  # VOC's 21; the names only label logs
    method = method_from_args(training, class_names)  # as the trainer builds it, every method flag applied
    networks = build_networks(model_config_from_args(training, class_names), method.num_models, seed=0)
    method.init_networks(networks)
    if setting["channels_last"]:
        networks = [network.to(memory_format=torch.channels_last) for network in networks]
    accelerator = fresh_accelerator(setting, args.device)
    trained, followers = networks[:method.trained_count], networks[method.trained_count:]
    optimizer = build_optimizer(trained, lr=training.learning_rate, momentum=training.momentum,
                                weight_decay=training.weight_decay, optimizer=training.optimizer,
                                head_lr_multiplier=training.head_lr_multiplier, betas=training.adam_betas)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 6 if setting["compile"] else 3)
    scheduler = poly_schedule(optimizer, 10 * (warmup + args.steps), power=training.lr_power)
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    *trained, optimizer, scheduler = accelerator.prepare(*trained, optimizer, scheduler)
    followers = [autocast_follower(f.to(accelerator.device).requires_grad_(False), accelerator) for f in followers]
    networks = [*trained, *followers]
    for network in networks:
        network.train()
    batch = fixed_batch(training, method.num_unlabeled_streams, len(class_names), accelerator.device)

    kept = []

    def step(index: int) -> float:
        output = method(networks, batch, index)
        kept.append(output.logs.get("pseudo_kept_u"))
        accelerator.backward(output.loss)
        optimizer.step()
        method.after_optimizer_step([accelerator.unwrap_model(n, keep_torch_compile=False) for n in networks], index)
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return float(output.loss.detach())

    losses, times = [], []
    for index in range(warmup):
        losses.append(step(index))
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    for index in range(warmup, warmup + args.steps):
        start = time.perf_counter()
        losses.append(step(index))  # float() waits for the GPU
        times.append(time.perf_counter() - start)
    images = training.per_device_train_batch_size * (1 + method.num_unlabeled_streams)
    result = {"step_s": statistics.median(times), "images_per_second": images / statistics.median(times),
              "images_per_step": images, "losses": losses, "pseudo_kept_u": kept, "warmup_steps": warmup,
              "peak_memory_gib": (torch.cuda.max_memory_allocated() / 2**30 if args.device.startswith("cuda")
                                  else None),
              "backbone": training.backbone, "crop": training.crop_size, "batch": training.per_device_train_batch_size,
              "method": training.method}
    del networks, trained, followers, optimizer, scheduler, method, accelerator
    gc.collect()
    return result


def with_ratios(results: dict) -> dict:
    """Each setting's images/s and memory over fp32's, and its losses' largest relative difference to fp32's."""
    base = results["fp32"]
    for name, r in results.items():
        r["speed_vs_fp32"] = r["images_per_second"] / base["images_per_second"]
        r["memory_vs_fp32"] = (r["peak_memory_gib"] / base["peak_memory_gib"]
                               if r["peak_memory_gib"] and base["peak_memory_gib"] else None)
        r["loss_rel_diff_vs_fp32"] = max(abs(a - b) / max(abs(b), 1e-12) for a, b in zip(r["losses"], base["losses"]))
        r["meets_goal"] = (r["speed_vs_fp32"] >= GOAL["images_per_second"] and r["memory_vs_fp32"] is not None
                           and r["memory_vs_fp32"] <= GOAL["memory"])
    return results


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"CPU ({torch.get_num_threads()} torch threads)"


def main(argv=None) -> dict:
    args = parse_args(argv)
    summary = {"benchmark": "gpu_speed", "device": device_name(args.device), "torch": torch.__version__,
               "quick": args.quick, "goal": GOAL, "cases": {}}
    for case in args.cases:
        results = {}
        for setting in args.settings:
            try:
                results[setting] = measure(case, setting, args)
            finally:
                reset_accelerate()
            r = results[setting]
            memory = f"{r['peak_memory_gib']:.1f} GiB" if r["peak_memory_gib"] is not None else "-"
            print(f"{case} {setting:>18}: {r['images_per_second']:8.1f} images/s, peak {memory}", flush=True)
        summary["cases"][case] = with_ratios(results)
        for setting, r in results.items():
            memory = f"{r['memory_vs_fp32']:.2f}x" if r["memory_vs_fp32"] is not None else "-"
            print(f"{case} {setting:>18}: {r['speed_vs_fp32']:.2f}x fp32 images/s, {memory} memory, losses within "
                  f"{r['loss_rel_diff_vs_fp32']:.1e} of fp32's", flush=True)
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    run_cli(main)
