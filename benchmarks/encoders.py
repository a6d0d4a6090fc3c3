"""What an encoder costs in a CPS + CutMix step: parameters, step time and peak memory, relative to ResNet-50.

Each encoder is built from its preset in configs/ (`parse_args(["--config", preset])`, then
`cps_hf.training.model_config_from_args` and `build_networks`, random init: nothing downloads) and
trained for a few steps of the preset's method (`cps_hf.methods.build_method`) on random images,
each encoder in its own subprocess, one after the other:

- params: backbone (the timm encoder), neck (a ViT's adapter to DeepLabv3+'s two inputs, if any)
  and head (ASPP + decoder + classifier), of ONE network (CPS trains two).
- step: median wall time of one training step's forward + backward for the two networks
  (`method(models, batch, step)` then `loss.backward()`: the pseudo-label forwards, CutMix, both
  networks' forward and backward, the losses). The optimizer step is left out, so SGD and AdamW
  recipes compare on the networks alone.
- memory, CPU: growth of the subprocess's peak resident set size (`ru_maxrss`) over the steps
  (warm-up included), i.e. what a step adds on top of the built networks and the batch
  (activations, autograd buffers, gradients), as the OS sees it (allocator caching included).
  The absolute peak RSS is in the JSON.
- memory, GPU: `torch.cuda.max_memory_allocated` during the steps: weights, batch, activations and
  gradients (tensors only; the caching allocator's reserve is not counted). The growth over what
  was allocated before the first step is in the JSON.

Times and memory are reported as ratios to `--reference` (resnet50s) measured in the same run;
absolute numbers depend on the machine and, on a shared CPU, on its other load.

    python benchmarks/encoders.py --quick              # CPU, crop 112, batch 2: a few minutes on 2 cores
    python benchmarks/encoders.py --output enc.json    # CPU, crop 224
    python benchmarks/encoders.py --device cuda        # GPU: each preset's crop (512 / 518), batch 8, bf16

The Markdown table goes to stdout; `--output` also writes everything as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]

# Encoder -> the preset it is measured with (architecture, method and lambda come from there).
ENCODER_PRESETS = {
    "resnet50s": "voc_r50_1-8_cps_cutmix.yaml",
    "resnet101s": "voc_r101_1-8_cps_cutmix.yaml",
    "convnext_tiny": "voc_convnext-t_1-8_cps_cutmix.yaml",
    "vit_small_patch14_dinov2": "voc_dinov2s_183_cps_cutmix.yaml",
}
NUM_LABELS = 21  # VOC


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="crop 112, batch 2, 1 warm-up + 2 timed steps")
    parser.add_argument("--encoders", nargs="+", default=list(ENCODER_PRESETS),
                        help=f"timm names; those with a preset use it ({', '.join(ENCODER_PRESETS)}), any other "
                             "name takes the resnet50s preset with --backbone NAME (multi-grid off)")
    parser.add_argument("--reference", default="resnet50s", help="ratios are to this encoder (measured first)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--crop", type=int, default=None,
                        help="square crop for every encoder (CPU default 224, quick 112: multiples of 14 and 16, "
                             "so neither a ViT nor a CNN pads); GPU default: each preset's crop_size")
    parser.add_argument("--batch", type=int, default=None,
                        help="labeled images per step (= unlabeled per stream); default 2 on CPU, 8 on GPU (CPS's "
                             "global batch, the same for every encoder so that memory compares)")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps (default 5, quick 2)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps first")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads per subprocess (default 1)")
    parser.add_argument("--precision", default=None, choices=["fp32", "bf16"],
                        help="autocast precision (default: bf16 on GPU, fp32 on CPU)")
    parser.add_argument("--head_channels", type=int, default=None,
                        help="override aspp_channels/decoder_channels (tests use a small head)")
    parser.add_argument("--output", default=None, help="also write the results as JSON here")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)  # internal: one encoder, JSON to stdout
    args = parser.parse_args(argv)
    if args.quick:
        args.crop = args.crop or 112
        args.repeats = args.repeats or 2
    args.repeats = args.repeats or 5
    args.precision = args.precision or ("bf16" if args.device == "cuda" else "fp32")
    if args.device == "cpu":
        args.crop = args.crop or 224
    args.batch = args.batch or (2 if args.device == "cpu" else 8)
    if args.batch < 2:
        parser.error("--batch must be >= 2 (the head's BatchNorm needs two values per channel in training)")
    return args


# ---------------------------------------------------------------------------------------------
# One encoder, in its own process
# ---------------------------------------------------------------------------------------------


def _preset_for(encoder: str) -> tuple[Path, list[str]]:
    if encoder in ENCODER_PRESETS:
        return ROOT / "configs" / ENCODER_PRESETS[encoder], []
    return ROOT / "configs" / ENCODER_PRESETS["resnet50s"], ["--backbone", encoder, "--multi_grid", "none"]


def _maxrss_bytes() -> int:
    scale = 1 if sys.platform == "darwin" else 1024  # Linux reports KiB, macOS bytes
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters()) if module is not None else 0


def run_worker(args) -> dict:
    import torch

    from cps_hf.losses import cross_entropy
    from cps_hf.methods import build_method
    from cps_hf.training import build_networks, model_config_from_args
    from cps_hf.training_args import parse_args as parse_training_args
    from step_efficiency import prepared_batch, timed  # beside this script, which the worker runs as

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    encoder = args.worker
    preset, extra = _preset_for(encoder)
    overrides = ["--pretrained_backbone", "none", *extra]
    if args.head_channels:
        overrides += ["--aspp_channels", str(args.head_channels), "--decoder_channels", str(args.head_channels)]
    train_args = parse_training_args(["--config", str(preset), *overrides])
    crop = args.crop or train_args.crop_size
    batch_size = args.batch
    config = model_config_from_args(train_args, [f"class_{i}" for i in range(NUM_LABELS)])
    method = build_method(train_args.method, cross_entropy, cps_weight=train_args.cps_weight, generator_seed=0)
    networks = [n.to(device).train() for n in build_networks(config, method.num_models, pretrained="none", seed=0)]

    net = networks[0]
    total = _count(net)
    backbone = _count(net.backbone)
    neck = _count(net.neck)
    params = {"backbone": backbone, "neck": neck, "head": total - backbone - neck, "total": total}

    batch = prepared_batch(SimpleNamespace(batch=batch_size, crop=crop, num_labels=NUM_LABELS, device=device),
                           method.num_unlabeled_streams)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")

    def step(index: int) -> float:
        def forward_backward():
            with autocast:
                output = method(networks, batch, index)
            output.loss.backward()

        elapsed = timed(forward_backward, device)
        for network in networks:
            network.zero_grad(set_to_none=True)
        return elapsed

    rss_before = _maxrss_bytes()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        allocated_before = torch.cuda.memory_allocated(device)
    times = [step(i) for i in range(args.warmup + args.repeats)][args.warmup:]
    result = {
        "encoder": encoder,
        "backbone": train_args.backbone,
        "preset": preset.name,
        "method": train_args.method,
        "output_stride": config.output_stride,
        "crop": crop,
        "batch": batch_size,
        "networks": method.num_models,
        "params": params,
        "step_s": statistics.median(times),
        "step_s_all": times,
        "rss_peak_mb": _maxrss_bytes() / 2**20,
        "rss_step_growth_mb": (_maxrss_bytes() - rss_before) / 2**20,
    }
    if device.type == "cuda":
        result["cuda_max_allocated_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
        result["cuda_step_allocated_gb"] = (torch.cuda.max_memory_allocated(device) - allocated_before) / 2**30
        result["labeled_images_per_s"] = batch_size / result["step_s"]
    return result


def measure(encoder: str, args) -> dict:
    """Runs this script on one encoder in a fresh process (its own peak RSS, no allocator carry-over)."""
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", encoder, "--device", args.device, "--repeats", str(args.repeats), "--warmup", str(args.warmup),
               "--threads", str(args.threads), "--precision", args.precision]
    for flag in ("crop", "batch", "head_channels"):
        if getattr(args, flag):
            command += [f"--{flag}", str(getattr(args, flag))]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"encoder {encoder} failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def markdown(results: list[dict], args) -> str:
    reference = next((r for r in results if r["encoder"] == args.reference), None)
    gpu = args.device == "cuda"
    memory_key = "cuda_max_allocated_gb" if gpu else "rss_step_growth_mb"
    memory_head = "max allocated (GB)" if gpu else "step RSS growth (MB)"

    def ratio(r, key):
        return f"{r[key] / reference[key]:.2f}" if reference and reference[key] > 0 else "-"

    head = ["encoder", "preset", "OS", "crop", "backbone (M)", "neck (M)", "head (M)", "step (s)", "time x ref",
            memory_head, "memory x ref"]
    if gpu:
        head.insert(9, "labeled img/s")
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        p = r["params"]
        cells = [r["encoder"], r["preset"].removesuffix(".yaml"), str(r["output_stride"] or "-"), str(r["crop"]),
                 f"{p['backbone'] / 1e6:.1f}", f"{p['neck'] / 1e6:.2f}", f"{p['head'] / 1e6:.2f}",
                 f"{r['step_s']:.3f}", ratio(r, "step_s"), f"{r[memory_key]:.2f}" if gpu else f"{r[memory_key]:.0f}",
                 ratio(r, memory_key)]
        if gpu:
            cells.insert(9, f"{r['labeled_images_per_s']:.1f}")
        rows.append("| " + " | ".join(cells) + " |")
    first = results[0]
    what = (f"{first['method']} step (forward + backward of {first['networks']} networks, no optimizer step), "
            f"batch {first['batch']} labeled + {first['batch']} unlabeled per stream, {args.precision}, "
            f"device {args.device}" + ("" if gpu else f", {args.threads} torch thread(s)")
            + f"; median of {args.repeats} steps after {args.warmup} warm-up; ratios to {args.reference}, same run.")
    return "\n".join(rows) + "\n\n" + what


def main(argv=None):
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(run_worker(args)))
        return None
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("--device cuda: no GPU visible")
    encoders = [args.reference] + [e for e in args.encoders if e != args.reference]
    results = []
    for encoder in encoders:
        results.append(measure(encoder, args))
        print(f"measured {encoder}: step {results[-1]['step_s']:.3f} s", file=sys.stderr, flush=True)
    table = markdown(results, args)
    print(table)
    summary = {"benchmark": "encoders", "settings": {k: v for k, v in vars(args).items() if k != "worker"},
               "results": results, "table": table}
    if args.output:
        Path(args.output).write_text(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    main()
