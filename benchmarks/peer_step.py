#!/usr/bin/env python
"""Our training step against the public reference code's, in one run: step time and peak memory as ratios.

    python benchmarks/peer_step.py --unimatch_path ../UniMatch --torchsemiseg_path ../TorchSemiSeg
    python benchmarks/peer_step.py --unimatch_path ../UniMatch --quick          # smoke run: crop 65, 2 repeats
    python benchmarks/peer_step.py --unimatch_path ../UniMatch --device cuda --depth 101 --crop 321 --batch 2

Give a clone of https://github.com/LiheYoung/UniMatch (`--unimatch_path`) and/or of
https://github.com/charlesCXK/TorchSemiSeg (`--torchsemiseg_path`, cloned into a folder named `TorchSemiSeg`:
its config.py finds the repository by that name in the working directory's path). Nothing of theirs is
copied into this repository: their model classes and helpers are imported from the clone, on the device
given, without their pretrained weights.

- unimatch: their `DeepLabV3Plus` (model/semseg/deeplabv3plus.py, their deep-stem ResNet-50/101 at output
  stride 16, as configs/pascal.yaml) against ours under `--method unimatch` (`resnet50s`/`resnet101s`, timm's
  deep-stem ResNet, output stride 16): the same layers and parameter count; the ASPP differs in form (theirs:
  five branches each with BN+ReLU, concatenated, 1x1 projection; ours, the CPS original's: four branches
  concatenated then one BN+LeakyReLU, 1x1 reduction, the pooled branch added; the parameter count is the
  same). Their model builds its backbone with pretrained=True, which reads `pretrained/resnet50.pth` from the
  working directory: while their model is built, their resnet module's constructor is wrapped to pass
  pretrained=False (restored after; nothing global is patched).
- cps: the CPS original's `Network` (exp.voc/voc8.res50v3+.CPS/network.py over furnace/base_model, ResNet-50
  with a 64-64-128 deep stem, output stride 16, multi-grid 2/4/8) against ours under `--method cps`
  (`resnet50s`, output stride 16, multi-grid 1/2/4: the same dilations). The network runs on CPU with
  torch's BatchNorm2d (their train.py passes apex's SyncBatchNorm). Their train.py itself cannot run on
  CPU: it raises ImportError at import unless NVIDIA apex is installed (docs/installation.md builds apex 0.1
  from furnace/apex with `--cpp_ext --cuda_ext`, which needs CUDA), calls dist.all_reduce unconditionally (a
  process group is needed), and its non-distributed branch uses DataParallelModel and BatchNorm2d, whose
  import is commented out (NameError). Their config.py needs the `easydict` package. ResNet-50 only: the
  repository has no ResNet-101 experiment folder.

A training script's loop is not importable, so each of their steps is written out here in our own words
from its loop body (UniMatch's unimatch.py; TorchSemiSeg's exp.voc/voc8.res50v3+.CPS/train.py), operation
for operation: forwards, pseudo labels, losses, zero_grad, backward, the SGD steps with their parameter
groups, the per-iteration LR update and the `.item()` reads of the loss logs. Left out on their side, being
one process: the DDP/SyncBatchNorm wrapping, `torch.distributed.barrier()` and `all_reduce` (an identity
with one process), and TensorBoard writes. Our step is the trainer's: the method call, backward, optimizer
and scheduler step, `after_optimizer_step`, zero_grad, logs as floats.

Both sides get the same random batch (seed 0): labeled images and masks, unlabeled images and, for
UniMatch, CutMix partners, two strong views of each and two CutMix boxes, all made before timing. UniMatch
makes its strong views in its DataLoader workers, outside the step; ours makes them on the step's device
inside it, so our method is handed the same precomputed views and boxes (the step's only change) and the
time ours spends making them is printed on a line of its own (`ours_strong_views_ms`, not in the ratio).

Each side runs in its own process (its own allocator state and peak memory, as a training run has), and
the parent makes them step in turn: every repeat runs both steps, alternating which goes first, after
`--warmup` untimed repeats; median and min per side, ratios ours/theirs (< 1: ours is faster). On CPU
the process's CPU time per step is given too: on a shared machine a step that waits for a core counts in
wall-clock time only, so CPU time is the steadier comparison there (with one torch thread on an idle machine
the two agree). The defaults (ResNet-50, crop 129, batch 2, 7 repeats, 1 thread) take about 5 minutes on 2
busy CPU cores.
Peak memory, per side's process after all its steps: on CPU the peak RSS (`ru_maxrss`) and its rise during
the steps above the peak before them, with the minor page faults per step (memory the allocator gave back
to the system and faults in again); on CUDA `max_memory_allocated` and its rise over the allocation before
the steps. Both sides' processes import the same libraries (torch, cps_hf with transformers and timm)
before building, so their baselines match. Page faults are part of a step's CPU time, and how many a step
takes depends on the process's allocation history under glibc's default malloc, not only on the step;
the workers inherit the environment, so `MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=17179869184`
in front of the command keeps freed memory in both processes and takes that out. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from cps_hf.cli import ArgumentParser, run_cli  # noqa: E402
from cps_hf.errors import UserInputError  # noqa: E402

PEERS = ("unimatch", "cps")
GOAL = 1.0  # ours / theirs, step time
PATH_FLAGS = {"unimatch": "--unimatch_path", "cps": "--torchsemiseg_path"}
CPS_EXPERIMENT = "exp.voc/voc8.res50v3+.CPS"
# What each clone must hold: the files the benchmark imports.
REQUIRED_FILES = {
    "unimatch": ("model/semseg/deeplabv3plus.py", "model/backbone/resnet.py"),
    "cps": (f"{CPS_EXPERIMENT}/network.py", f"{CPS_EXPERIMENT}/config.py", "furnace/base_model/resnet.py",
            "furnace/utils/init_func.py", "furnace/engine/lr_policy.py"),
}
CLONE_HINT = {
    "unimatch": "git clone https://github.com/LiheYoung/UniMatch and pass that folder",
    "cps": "git clone https://github.com/charlesCXK/TorchSemiSeg and pass that folder",
}
# The references' own settings (UniMatch configs/pascal.yaml; TorchSemiSeg exp.voc config.py)
UNIMATCH_SETTINGS = dict(lr=0.001, lr_multi=10.0, weight_decay=1e-4, conf_thresh=0.95)
CPS_SETTINGS = dict(lr=0.005, weight_decay=1e-4, cps_weight=1.5)


def parse_args(argv=None):
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--unimatch_path", type=Path, default=None,
                        help="folder of a LiheYoung/UniMatch clone: time its UniMatch step against --method unimatch")
    parser.add_argument("--torchsemiseg_path", type=Path, default=None,
                        help="folder of a charlesCXK/TorchSemiSeg clone, named TorchSemiSeg: time its CPS step "
                             "against --method cps (ResNet-50 only)")
    parser.add_argument("--depth", type=int, choices=(50, 101), default=50,
                        help="ResNet depth on both sides (theirs resnet50/101, ours resnet50s/101s)")
    parser.add_argument("--crop", type=int, default=None, help="square crop size (default 129, quick 65)")
    parser.add_argument("--batch", type=int, default=2,
                        help="images per batch: labeled = unlabeled (UniMatch's VOC setting per GPU)")
    parser.add_argument("--num_labels", type=int, default=21, help="classes (VOC's 21)")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per side (default 7, quick 2)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed repeats first (default 1)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads, the same on both sides")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available, else cpu)")
    parser.add_argument("--quick", action="store_true", help="small crop, 2 repeats: a smoke run")
    parser.add_argument("--_worker", nargs=2, metavar=("PEER", "SIDE"), default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.crop = (65 if args.quick else 129) if args.crop is None else args.crop
    args.repeats = (2 if args.quick else 7) if args.repeats is None else args.repeats
    args.warmup = 1 if args.warmup is None else args.warmup
    for name in ("crop", "batch", "num_labels", "repeats", "threads"):
        if getattr(args, name) < 1:
            raise UserInputError(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.batch < 2:
        raise UserInputError("--batch must be at least 2: the ASPP's image-pooling BatchNorm needs 2 images")
    if args.crop < 33:
        raise UserInputError(f"--crop must be at least 33 (output stride 16 with room to dilate), got {args.crop}")
    if args.warmup < 0:
        raise UserInputError(f"--warmup must be 0 or more, got {args.warmup}")
    return args


def peer_paths(args) -> dict[str, Path]:
    """The peers to run, each with its clone folder; a wrong folder is one line naming the flag."""
    given = {"unimatch": args.unimatch_path, "cps": args.torchsemiseg_path}
    if not any(given.values()):
        raise UserInputError("nothing to compare: give --unimatch_path (a LiheYoung/UniMatch clone) and/or "
                             "--torchsemiseg_path (a charlesCXK/TorchSemiSeg clone)")
    paths = {}
    for peer, path in given.items():
        if path is None:
            continue
        flag = PATH_FLAGS[peer]
        path = path.expanduser().resolve()
        if not path.is_dir():
            raise UserInputError(f"{flag} {path}: no such folder; {CLONE_HINT[peer]}")
        missing = [name for name in REQUIRED_FILES[peer] if not (path / name).is_file()]
        if missing:
            raise UserInputError(f"{flag} {path}: not a {'UniMatch' if peer == 'unimatch' else 'TorchSemiSeg'} "
                                 f"clone (missing {', '.join(missing)}); {CLONE_HINT[peer]}")
        if peer == "cps" and "TorchSemiSeg" not in str(path / CPS_EXPERIMENT):
            raise UserInputError(f"{flag} {path}: their config.py finds the repository by the name 'TorchSemiSeg' "
                                 "in the working directory's path; clone (or link) it into a folder named TorchSemiSeg")
        if peer == "cps" and args.depth != 50:
            raise UserInputError(f"{flag}: the CPS original has ResNet-50 experiments only; use --depth 50 "
                                 "(or leave --torchsemiseg_path out)")
        paths[peer] = path
    return paths


# ------------------------------------------------------------------------------------------------
# Inside a child process: the shared batch, each side's model and step
# ------------------------------------------------------------------------------------------------


def _torch():
    import torch

    return torch


def synchronize(device) -> None:
    torch = _torch()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def make_batch(peer: str, args) -> dict:
    """The random batch both sides see (seed 0), on the device. Masks are labels with ~5% ignored pixels."""
    torch = _torch()
    from cps_hf.strong_views import cutmix_boxes, strong_view
    from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

    g = torch.Generator().manual_seed(0)
    shape = (args.batch, 3, args.crop, args.crop)
    labels = torch.randint(0, args.num_labels, (args.batch, args.crop, args.crop), generator=g)
    labels[torch.rand(labels.shape, generator=g) < 0.05] = 255
    batch = {"images": torch.randn(shape, generator=g), "labels": labels, "unlabeled": torch.randn(shape, generator=g)}
    if peer == "unimatch":
        batch["partners"] = torch.randn(shape, generator=g)
        for name in ("unlabeled", "partners"):  # two strong views of each, as UniMatch's loader hands them over
            for k in (1, 2):
                batch[f"{name}_s{k}"] = strong_view(batch[name], IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, g)
        for k in (1, 2):
            boxes = torch.zeros(args.batch, args.crop, args.crop, dtype=torch.bool)
            while not boxes.any():  # at least one box, so the mixing is exercised
                boxes = cutmix_boxes(args.batch, args.crop, args.crop, g)
            batch[f"box{k}"] = boxes
    return {name: tensor.to(args.device) for name, tensor in batch.items()}


class Side:
    """One side of a comparison: `step()` runs one training step; `fresh()` prepares its inputs (untimed)."""

    def __init__(self, name: str, step, parameters: int, fresh=None, last_loss=None):
        self.name, self.step, self.parameters = name, step, parameters
        self.fresh = fresh or (lambda: None)
        self.last_loss = last_loss or (lambda: float("nan"))


def _count(modules) -> int:
    return sum(p.numel() for m in modules for p in m.parameters())


# ---- ours --------------------------------------------------------------------------------------


def our_config(args, peer: str, backbone: str | None = None, **overrides):
    from cps_hf import CPSConfig

    names = _method_options(args.num_labels)["class_names"]
    fields = dict(backbone=backbone or f"resnet{args.depth}s", output_stride=16, num_labels=args.num_labels,
                  id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)})
    if peer == "cps":
        fields["multi_grid"] = [1, 2, 4]  # the original's layer4 dilations 2/4/8
    fields.update(overrides)
    return CPSConfig(**fields)


def _method_options(num_labels: int) -> dict:
    """What scripts/train_cps.py also passes: the class names (VOC-like, class 0 the background)."""
    return dict(class_names=["background"] + [f"class_{i}" for i in range(1, num_labels)], background_index=0)


def _prepared_views_method(batch: dict, num_labels: int):
    """UniMatchMethod handed the batch's precomputed strong views and CutMix boxes (UniMatch's loader makes
    them outside its step); every other line of its step is the trainer's."""
    from cps_hf.losses import cross_entropy
    from cps_hf.methods import UniMatchMethod

    class PreparedViews(UniMatchMethod):
        def compute(self, models, step_batch, step, generator):
            self._views = {step_batch["unlabeled"][0]["pixel_values"].data_ptr(): [batch["unlabeled_s1"],
                                                                                  batch["unlabeled_s2"]],
                           step_batch["unlabeled"][1]["pixel_values"].data_ptr(): [batch["partners_s1"],
                                                                                  batch["partners_s2"]]}
            self._boxes = [batch["box1"], batch["box2"]]
            return super().compute(models, step_batch, step, generator)

        def strong(self, images, generator):
            return self._views[images.data_ptr()].pop(0)

        def boxes(self, images, generator):
            return self._boxes.pop(0)

    return PreparedViews.from_options(cross_entropy, **_method_options(num_labels))


def our_side(peer: str, args, batch: dict, backbone: str | None = None, **config_overrides) -> Side:
    """cps_hf's networks, method, optimizer and schedule, as scripts/train_cps.py builds them; the step as its loop."""
    from cps_hf.losses import cross_entropy
    from cps_hf.methods import build_method
    from cps_hf.optim import build_optimizer, poly_schedule
    from cps_hf.training import build_networks

    config = our_config(args, peer, backbone, **config_overrides)
    if peer == "unimatch":
        method = _prepared_views_method(batch, args.num_labels)
        step_batch = {"labeled": {"pixel_values": batch["images"], "labels": batch["labels"]},
                      "unlabeled": [{"pixel_values": batch["unlabeled"]}, {"pixel_values": batch["partners"]}]}
        settings = UNIMATCH_SETTINGS
        optimizer_options = dict(lr=settings["lr"], weight_decay=settings["weight_decay"],
                                 head_lr_multiplier=settings["lr_multi"])
    else:
        method = build_method("cps", cross_entropy, cps_weight=CPS_SETTINGS["cps_weight"],
                              **_method_options(args.num_labels))
        step_batch = {"labeled": {"pixel_values": batch["images"], "labels": batch["labels"]},
                      "unlabeled": [{"pixel_values": batch["unlabeled"]}]}
        optimizer_options = dict(lr=CPS_SETTINGS["lr"], weight_decay=CPS_SETTINGS["weight_decay"])
    networks = [n.to(args.device) for n in build_networks(config, method.num_models, pretrained="none")]
    method.init_networks(networks)
    for network in networks:
        network.train()
    trained = networks[:method.trained_count]
    optimizer = build_optimizer(trained, **optimizer_options)
    scheduler = poly_schedule(optimizer, total_steps=1000)
    state = {"step": 0, "loss": float("nan")}

    def step():
        hand_off = {"labeled": {k: v.to(args.device, non_blocking=True) for k, v in step_batch["labeled"].items()},
                    "unlabeled": [{k: v.to(args.device, non_blocking=True) for k, v in s.items()}
                                  for s in step_batch["unlabeled"]]}
        output = method(networks, hand_off, state["step"])
        output.loss.backward()
        optimizer.step()
        method.after_optimizer_step(networks, state["step"])
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        state["step"] += 1
        state["loss"] = output.logs["loss"]

    return Side("ours", step, _count(networks), last_loss=lambda: state["loss"])


def our_strong_views(args, batch: dict):
    """What the precomputed views save our step: the 4 strong views and 2 CutMix boxes of a UniMatch step."""
    from cps_hf.losses import cross_entropy
    from cps_hf.methods import build_method

    method = build_method("unimatch", cross_entropy, **_method_options(args.num_labels))
    generator = method.generator(0, 0, 0)

    def make():
        for _ in range(2):
            method.boxes(batch["unlabeled"], generator)
        for _ in range(2):
            method.strong(batch["partners"], generator)
            method.strong(batch["unlabeled"], generator)

    return make


# ---- theirs: import helpers ---------------------------------------------------------------------


def _import_from_clone(peer: str, path: Path, module: str):
    """Import one of their modules; a missing one is one line: a package to install, or a clone that lacks a file."""
    import importlib

    flag = PATH_FLAGS[peer]
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as error:
        top = (error.name or "").split(".")[0]
        ours = any((folder / top).exists() or (folder / f"{top}.py").exists()
                   for folder in (path, path / "furnace", path / CPS_EXPERIMENT))
        what = ("a file the clone lacks (an incomplete clone?)" if ours
                else f"the package {top!r}, not installed here (pip install {top})")
        raise UserInputError(f"{flag} {path}: importing their {module} needs {what}: {error}") from None
    except ImportError as error:
        raise UserInputError(f"{flag} {path}: importing their {module} failed: {error}") from None


def _module_location(module) -> str:
    return str(getattr(module, "__file__", None) or next(iter(getattr(module, "__path__", [])), ""))


def _check_free(names, peer: str, path: Path) -> None:
    """Their top-level module names must not be taken already (another package of the same name)."""
    taken = [name for name in names
             if name in sys.modules and not _module_location(sys.modules[name]).startswith(str(path))]
    if taken:
        raise UserInputError(f"{PATH_FLAGS[peer]}: their top-level modules {taken} clash with modules already "
                             "imported here; run the benchmark in an environment without packages of those names")


# ---- theirs: UniMatch ----------------------------------------------------------------------------


def their_unimatch_model(path: Path, depth: int, num_labels: int):
    """UniMatch's DeepLabV3Plus as configs/pascal.yaml builds it, without its pretrained backbone file."""
    _check_free(("model", "util"), "unimatch", path)
    sys.path.insert(0, str(path))
    semseg = _import_from_clone("unimatch", path, "model.semseg.deeplabv3plus")
    resnet = _import_from_clone("unimatch", path, "model.backbone.resnet")
    name = f"resnet{depth}"
    original = getattr(resnet, name)
    # DeepLabV3Plus passes pretrained=True (a torch.load of pretrained/<name>.pth); random weights here.
    setattr(resnet, name, lambda pretrained=False, **kwargs: original(False, **kwargs))
    try:
        return semseg.DeepLabV3Plus({"backbone": name, "replace_stride_with_dilation": [False, False, True],
                                     "dilations": [6, 12, 18], "nclass": num_labels})
    finally:
        setattr(resnet, name, original)


def their_unimatch_side(path: Path, args, batch: dict) -> Side:
    """UniMatch's unimatch.py loop body, operation for operation (see the module docstring)."""
    torch = _torch()
    from torch import nn

    settings = UNIMATCH_SETTINGS
    model = their_unimatch_model(path, args.depth, args.num_labels).to(args.device)
    head = [p for n, p in model.named_parameters() if "backbone" not in n]
    optimizer = torch.optim.SGD([{"params": model.backbone.parameters(), "lr": settings["lr"]},
                                 {"params": head, "lr": settings["lr"] * settings["lr_multi"]}],
                                lr=settings["lr"], momentum=0.9, weight_decay=settings["weight_decay"])
    labeled_loss = nn.CrossEntropyLoss(ignore_index=255).to(args.device)  # configs/pascal.yaml: CELoss
    pixel_loss = nn.CrossEntropyLoss(reduction="none").to(args.device)
    threshold, total_iters = settings["conf_thresh"], 1000
    ignore = torch.zeros_like(batch["labels"])  # no padded pixels in these crops
    state = {"iter": 0, "inputs": None, "loss": float("nan")}

    def fresh():
        """The loader's hand-off: new tensors each iteration (their step writes into the strong views)."""
        state["inputs"] = {
            "x": batch["images"], "y": batch["labels"], "w": batch["unlabeled"],
            "s1": batch["unlabeled_s1"].clone(), "s2": batch["unlabeled_s2"].clone(), "ignore": ignore.clone(),
            "box1": batch["box1"].float(), "box2": batch["box2"].float(), "w_mix": batch["partners"],
            "s1_mix": batch["partners_s1"].clone(), "s2_mix": batch["partners_s2"].clone(),
            "ignore_mix": ignore.clone()}

    def unsupervised(logits, targets, confidence, ignored):
        per_pixel = pixel_loss(logits, targets) * ((confidence >= threshold) & (ignored != 255))
        return per_pixel.sum() / (ignored != 255).sum().item()

    def step():
        d = {k: v.to(args.device) for k, v in state["inputs"].items()}
        with torch.no_grad():  # the CutMix partners' predictions, eval mode
            model.eval()
            mix_logits = model(d["w_mix"]).detach()
            mix_conf = mix_logits.softmax(dim=1).max(dim=1)[0]
            mix_labels = mix_logits.argmax(dim=1)
        for k in ("1", "2"):  # paste the partners' strong views into the box, in place
            inside = d["box" + k].unsqueeze(1).expand(d["s" + k].shape) == 1
            d["s" + k][inside] = d[f"s{k}_mix"][inside]
        model.train()
        n_x, n_u = d["x"].shape[0], d["w"].shape[0]
        logits, logits_fp = model(torch.cat((d["x"], d["w"])), True)
        logits_x, logits_w = logits.split([n_x, n_u])
        logits_w_fp = logits_fp[n_x:]
        logits_s1, logits_s2 = model(torch.cat((d["s1"], d["s2"]))).chunk(2)
        logits_w = logits_w.detach()
        conf_w = logits_w.softmax(dim=1).max(dim=1)[0]
        labels_w = logits_w.argmax(dim=1)
        mixed = {}
        for k in ("1", "2"):
            labels, conf, ignored = labels_w.clone(), conf_w.clone(), d["ignore"].clone()
            box = d["box" + k] == 1
            labels[box], conf[box], ignored[box] = mix_labels[box], mix_conf[box], d["ignore_mix"][box]
            mixed[k] = (labels, conf, ignored)
        loss_x = labeled_loss(logits_x, d["y"])
        loss_s1 = unsupervised(logits_s1, *mixed["1"])
        loss_s2 = unsupervised(logits_s2, *mixed["2"])
        loss_fp = unsupervised(logits_w_fp, labels_w, conf_w, d["ignore"])
        loss = (loss_x + loss_s1 * 0.25 + loss_s2 * 0.25 + loss_fp * 0.5) / 2.0
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        logged = [loss.item(), loss_x.item(), (loss_s1.item() + loss_s2.item()) / 2.0, loss_fp.item()]
        kept = ((conf_w >= threshold) & (d["ignore"] != 255)).sum().item() / (d["ignore"] != 255).sum()
        logged.append(kept.item())
        lr = settings["lr"] * (1 - state["iter"] / total_iters) ** 0.9
        optimizer.param_groups[0]["lr"] = lr
        optimizer.param_groups[1]["lr"] = lr * settings["lr_multi"]
        state["iter"] += 1
        state["loss"] = logged[0]

    return Side("theirs", step, _count([model]), fresh=fresh, last_loss=lambda: state["loss"])


# ---- theirs: CPS (TorchSemiSeg) -----------------------------------------------------------------


def their_cps_network(path: Path, num_labels: int):
    """The CPS original's two-branch Network on torch's BatchNorm2d, initialised as its train.py does.
    Imported from the experiment folder, as their scripts run (config.py reads the working directory)."""
    from torch import nn

    experiment = path / CPS_EXPERIMENT
    _check_free(("config", "network", "utils", "engine", "seg_opr", "base_model"), "cps", path)
    sys.path[:0] = [str(experiment), str(path / "furnace")]
    here = os.getcwd()
    os.chdir(experiment)
    try:
        config = _import_from_clone("cps", path, "config").config
        network = _import_from_clone("cps", path, "network")
        init_func = _import_from_clone("cps", path, "utils.init_func")
        lr_policy = _import_from_clone("cps", path, "engine.lr_policy")
    finally:
        os.chdir(here)
    criterion = nn.CrossEntropyLoss(reduction="mean", ignore_index=255)
    model = network.Network(num_labels, criterion=criterion, pretrained_model=None, norm_layer=nn.BatchNorm2d)
    for branch in (model.branch1, model.branch2):
        init_func.init_weight(branch.business_layer, nn.init.kaiming_normal_, nn.BatchNorm2d, config.bn_eps,
                              config.bn_momentum, mode="fan_in", nonlinearity="relu")
    return model, criterion, init_func, lr_policy


def their_cps_side(path: Path, args, batch: dict) -> Side:
    """TorchSemiSeg's exp.voc/voc8.res50v3+.CPS/train.py loop body, operation for operation."""
    torch = _torch()
    from torch import nn

    settings = CPS_SETTINGS
    model, criterion, init_func, lr_policy = their_cps_network(path, args.num_labels)
    optimizers = []
    for branch in (model.branch1, model.branch2):
        groups = init_func.group_weight([], branch.backbone, nn.BatchNorm2d, settings["lr"])
        for module in branch.business_layer:
            groups = init_func.group_weight(groups, module, nn.BatchNorm2d, settings["lr"])
        optimizers.append(torch.optim.SGD(groups, lr=settings["lr"], momentum=0.9,
                                          weight_decay=settings["weight_decay"]))
    model.to(args.device)
    model.train()
    policy = lr_policy.WarmUpPolyLR(settings["lr"], 0.9, 1000, 0)
    state = {"iter": 0, "loss": float("nan")}

    def step():
        for optimizer in optimizers:
            optimizer.zero_grad()
        images = batch["images"].to(args.device, non_blocking=True)
        unlabeled = batch["unlabeled"].to(args.device, non_blocking=True)
        labels = batch["labels"].to(args.device, non_blocking=True)
        _, sup_1 = model(images, step=1)
        _, unsup_1 = model(unlabeled, step=1)
        _, sup_2 = model(images, step=2)
        _, unsup_2 = model(unlabeled, step=2)
        logits_1, logits_2 = torch.cat([sup_1, unsup_1], dim=0), torch.cat([sup_2, unsup_2], dim=0)
        _, argmax_1 = torch.max(logits_1, dim=1)
        _, argmax_2 = torch.max(logits_2, dim=1)
        cps = (criterion(logits_1, argmax_2.long()) + criterion(logits_2, argmax_1.long())) * settings["cps_weight"]
        loss_sup_1, loss_sup_2 = criterion(sup_1, labels), criterion(sup_2, labels)
        lr = policy.get_lr(state["iter"])
        for optimizer in optimizers:
            for group in optimizer.param_groups:
                group["lr"] = lr
        loss = loss_sup_1 + loss_sup_2 + cps
        loss.backward()
        for optimizer in optimizers:
            optimizer.step()
        logged = [loss_sup_1.item(), loss_sup_2.item(), cps.item()]
        state["iter"] += 1
        state["loss"] = sum(logged)

    return Side("theirs", step, _count([model]), last_loss=lambda: state["loss"])


def build_side(peer: str, side: str, path: Path, args, batch: dict) -> Side:
    if side == "ours":
        return our_side(peer, args, batch)
    return their_unimatch_side(path, args, batch) if peer == "unimatch" else their_cps_side(path, args, batch)


def timed(side: Side, device) -> tuple[float, float]:
    """Wall-clock and process CPU seconds of one step (its inputs prepared first, untimed)."""
    side.fresh()
    synchronize(device)
    start, start_cpu = time.perf_counter(), time.process_time()
    side.step()
    synchronize(device)
    return time.perf_counter() - start, time.process_time() - start_cpu


def _peak_rss_bytes() -> int:
    import resource

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def _minor_faults() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


MARK = "@@peer_step "  # the workers' answers on stdout; any other line is passed on to stderr


def run_worker(peer: str, side_name: str, path: Path, args) -> int:
    """One side alone in this process, stepping when the parent says "step" on stdin.

    The parent interleaves two of these (ours, theirs), so slow drift of a shared machine hits both
    alike while each side keeps its own process: its own allocator state (glibc returns freed memory to
    the system and takes it back with page faults, differently for different allocation patterns; one
    side must not pay for the other's) and its own peak memory."""
    import importlib

    torch = _torch()

    def answer(message: dict) -> None:
        print(MARK + json.dumps(message), flush=True)

    # Both sides' processes import the same libraries before building, so the memory baselines match.
    for module in ("cps_hf.losses", "cps_hf.methods", "cps_hf.optim", "cps_hf.strong_views", "cps_hf.training"):
        importlib.import_module(module)
    try:
        batch = make_batch(peer, args)
        side = build_side(peer, side_name, path, args, batch)
    except UserInputError as error:
        answer({"error": str(error)})
        return 2
    cuda = torch.device(args.device).type == "cuda"
    synchronize(args.device)
    if cuda:
        torch.cuda.reset_peak_memory_stats(args.device)
    before = torch.cuda.memory_allocated(args.device) if cuda else _peak_rss_bytes()
    answer({"ready": True, "parameters": side.parameters})
    for line in sys.stdin:
        command = line.strip()
        if command == "step":
            faults = _minor_faults()
            wall, cpu = timed(side, args.device)
            answer({"wall": wall, "cpu": cpu, "minor_faults": _minor_faults() - faults})
        elif command == "views":  # ours, UniMatch: what the precomputed views save the step
            make, times = our_strong_views(args, batch), []
            for _ in range(args.repeats):
                synchronize(args.device)
                start = time.perf_counter()
                make()
                synchronize(args.device)
                times.append(time.perf_counter() - start)
            answer({"views_s": statistics.median(times)})
        elif command == "finish":
            peak = torch.cuda.max_memory_allocated(args.device) if cuda else _peak_rss_bytes()
            answer({"memory_kind": "cuda_max_memory_allocated" if cuda else "peak_rss", "peak_bytes": peak,
                    "before_steps_bytes": before, "step_rise_bytes": max(peak - before, 0),
                    "last_loss": side.last_loss()})
            break
    return 0


class Worker:
    """The parent's handle on one side's process."""

    def __init__(self, args, peer: str, path: Path, side: str):
        self.side = side
        argv = [sys.executable, str(Path(__file__).resolve()), PATH_FLAGS[peer], str(path), "--depth",
                str(args.depth), "--crop", str(args.crop), "--batch", str(args.batch), "--num_labels",
                str(args.num_labels), "--repeats", str(args.repeats), "--warmup", str(args.warmup), "--threads",
                str(args.threads), "--device", args.device, "--_worker", peer, side]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads)}
        self.process = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)

    def read(self) -> dict:
        for line in self.process.stdout:
            if not line.startswith(MARK):
                sys.stderr.write(line)
                continue
            message = json.loads(line[len(MARK):])
            if "error" in message:
                raise UserInputError(message["error"])
            return message
        status = self.process.wait()
        raise RuntimeError(f"the benchmark process of side {self.side!r} ended without answering "
                           f"(exit status {status}; its traceback is above)")

    def ask(self, command: str) -> dict:
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self.read()

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


def _stats(values: list[float]) -> dict:
    return {"median_s": statistics.median(values), "min_s": min(values)}


def measure_peer(peer: str, path: Path, args) -> dict:
    """Both sides, each in its own process, one step each per repeat in alternating order."""
    print(f"[{peer}] building both sides, then {args.warmup} warm-up + {args.repeats} timed repeats each ...",
          flush=True)
    workers = {}
    try:
        for side in ("theirs", "ours"):
            workers[side] = Worker(args, peer, path, side)
        ready = {side: worker.read() for side, worker in workers.items()}
        steps = {side: [] for side in workers}
        for repeat in range(args.warmup + args.repeats):
            for side in (("ours", "theirs") if repeat % 2 == 0 else ("theirs", "ours")):
                answer = workers[side].ask("step")
                if repeat >= args.warmup:
                    steps[side].append(answer)
        views = workers["ours"].ask("views")["views_s"] if peer == "unimatch" else None
        finish = {side: worker.ask("finish") for side, worker in workers.items()}
    finally:
        for worker in workers.values():
            worker.close()
    result = {}
    for side in workers:
        wall, cpu = [s["wall"] for s in steps[side]], [s["cpu"] for s in steps[side]]
        result[side] = {"times_s": wall, **_stats(wall), "cpu_times_s": cpu, "cpu": _stats(cpu),
                        "minor_faults_per_step": statistics.median(s["minor_faults"] for s in steps[side]),
                        "parameters": ready[side]["parameters"], "last_loss": finish[side]["last_loss"],
                        "memory": finish[side]}
    ours, theirs = result["ours"], result["theirs"]
    result["ratio_of_medians"] = ours["median_s"] / theirs["median_s"]
    result["ratio_of_mins"] = ours["min_s"] / theirs["min_s"]
    result["median_paired_ratio"] = statistics.median(o / t for o, t in zip(ours["times_s"], theirs["times_s"]))
    result["cpu_ratio_of_medians"] = ours["cpu"]["median_s"] / theirs["cpu"]["median_s"]
    result["cpu_ratio_of_mins"] = ours["cpu"]["min_s"] / theirs["cpu"]["min_s"]
    result["peak_ratio"] = ours["memory"]["peak_bytes"] / theirs["memory"]["peak_bytes"]
    rise = theirs["memory"]["step_rise_bytes"]
    result["step_rise_ratio"] = ours["memory"]["step_rise_bytes"] / rise if rise else None
    if views is not None:
        result["ours_strong_views_s"] = views
    return result


ARCHITECTURE = {
    "unimatch": "theirs: UniMatch DeepLabV3Plus (deep-stem ResNet-{d}, layer4 dilated: OS16, ASPP 6/12/18 with BN+ReLU "
                "per branch and a 1x1 projection); ours: resnet{d}s (timm deep stem, OS16) + CPS-original ASPP "
                "(one BN+LeakyReLU over the concatenated branches, pooled branch added). Same decoder, same "
                "parameter count; feature perturbation: Dropout2d(0.5) on both inputs of the head, head on 2B "
                "in one pass, on both sides",
    "cps": "theirs: CPS original Network (ResNet-50 deep stem 64-64-128, layer4 dilations 2/4/8: OS16) on "
           "torch BatchNorm2d; ours: resnet50s, output_stride 16, multi_grid 1/2/4 (dilations 2/4/8), the same "
           "ASPP and decoder; two networks each side",
}


def report(results: dict, args) -> dict:
    import torch

    on_cpu = torch.device(args.device).type == "cpu"
    print()
    print(f"device {args.device}, torch threads {args.threads}, ResNet-{args.depth}, crop {args.crop}, "
          f"batch {args.batch} labeled + {args.batch} unlabeled, {args.repeats} timed repeats after {args.warmup} "
          f"warm-up; step times in ms, memory in MiB ({'peak RSS' if on_cpu else 'max_memory_allocated'})")
    columns = ("wall median", "wall min", "CPU median", "CPU min", "parameters", "peak memory", "rise in steps")
    header = f"{'peer':<9} {'side':<12}" + "".join(f"{c:>14}" for c in columns)
    print(header)
    print("-" * len(header))
    summary = {"benchmark": "peer_step", "goal": GOAL, "device": args.device, "torch_threads": args.threads,
               "depth": args.depth, "crop": args.crop, "batch": args.batch, "repeats": args.repeats,
               "warmup": args.warmup, "torch": torch.__version__, "peers": {}}
    sides = ("ours", "theirs")
    for peer, result in results.items():
        for side in ("theirs", "ours"):
            t, m = result[side], result[side]["memory"]
            cells = [f"{t['median_s'] * 1e3:.0f}", f"{t['min_s'] * 1e3:.0f}",
                     f"{t['cpu']['median_s'] * 1e3:.0f}" if on_cpu else "-",
                     f"{t['cpu']['min_s'] * 1e3:.0f}" if on_cpu else "-", f"{t['parameters']:,}",
                     f"{m['peak_bytes'] / 2**20:.0f}", f"{m['step_rise_bytes'] / 2**20:.0f}"]
            print(f"{peer:<9} {side:<12}" + "".join(f"{c:>14}" for c in cells))
        rise = result["step_rise_ratio"]
        ratios = [result["ratio_of_medians"], result["ratio_of_mins"],
                  result["cpu_ratio_of_medians"] if on_cpu else None, result["cpu_ratio_of_mins"] if on_cpu else None,
                  result["ours"]["parameters"] / result["theirs"]["parameters"], result["peak_ratio"], rise]
        print(f"{peer:<9} {'ours/theirs':<12}" + "".join(f"{'-' if r is None else f'{r:.3f}':>14}" for r in ratios))
        note = f"paired median (each repeat's ours/theirs, wall): {result['median_paired_ratio']:.3f}"
        if on_cpu:
            note += ("; minor page faults per step (memory the allocator took back from the system): ours "
                     f"{result['ours']['minor_faults_per_step']:.0f}, theirs {result['theirs']['minor_faults_per_step']:.0f}")
        print(f"{'':<9} {note}")
        if "ours_strong_views_s" in result:
            print(f"{'':<9} not in the step above: ours makes its 4 strong views + 2 CutMix boxes on the device in "
                  f"{result['ours_strong_views_s'] * 1e3:.0f} ms (UniMatch: in its DataLoader workers)")
        print(f"{'':<9} {ARCHITECTURE[peer].format(d=args.depth)}")
        entry = {
            "ratio_of_medians": round(result["ratio_of_medians"], 4),
            "ratio_of_mins": round(result["ratio_of_mins"], 4),
            "median_paired_ratio": round(result["median_paired_ratio"], 4),
            "meets_goal": result["ratio_of_medians"] <= GOAL,
            "step_ms": {side: {"median": round(result[side]["median_s"] * 1e3, 1),
                               "min": round(result[side]["min_s"] * 1e3, 1)} for side in sides},
            "parameters": {side: result[side]["parameters"] for side in sides},
            "last_loss": {side: result[side]["last_loss"] for side in sides},
            "memory_kind": result["ours"]["memory"]["memory_kind"],
            "peak_mib": {side: round(result[side]["memory"]["peak_bytes"] / 2**20, 1) for side in sides},
            "step_rise_mib": {side: round(result[side]["memory"]["step_rise_bytes"] / 2**20, 1) for side in sides},
            "peak_ratio": round(result["peak_ratio"], 4),
            "step_rise_ratio": None if rise is None else round(rise, 4),
        }
        if on_cpu:
            entry["cpu_ratio_of_medians"] = round(result["cpu_ratio_of_medians"], 4)
            entry["cpu_ratio_of_mins"] = round(result["cpu_ratio_of_mins"], 4)
            entry["cpu_step_ms"] = {side: {"median": round(result[side]["cpu"]["median_s"] * 1e3, 1),
                                           "min": round(result[side]["cpu"]["min_s"] * 1e3, 1)} for side in sides}
            entry["minor_faults_per_step"] = {side: result[side]["minor_faults_per_step"] for side in sides}
        if "ours_strong_views_s" in result:
            entry["ours_strong_views_ms"] = round(result["ours_strong_views_s"] * 1e3, 1)
        summary["peers"][peer] = entry
    for peer in PEERS:
        if peer not in results:
            summary[f"{peer}_note"] = f"not run: give {PATH_FLAGS[peer]}"
    print(json.dumps(summary))
    return summary


def main(argv=None):
    args = parse_args(argv)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    paths = peer_paths(args)
    if args._worker:
        peer, side = args._worker
        _torch().set_num_threads(args.threads)
        if _torch().device(args.device).type == "cuda":
            _torch().backends.cudnn.benchmark = True  # as both references' scripts set it; the same for both sides
        return run_worker(peer, side, paths[peer], args)
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise UserInputError(f"--device {args.device}: torch sees no CUDA device here; use --device cpu")
    results = {peer: measure_peer(peer, path, args) for peer, path in paths.items()}
    report(results, args)
    return 0


if __name__ == "__main__":
    sys.exit(run_cli(main))
