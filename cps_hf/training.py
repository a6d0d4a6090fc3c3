"""Pieces of the training script that are not the loop itself: building the two networks,
SyncBN, checkpoint discovery, the step counter that travels with checkpoints, the JSONL log,
and the cross-rank consistency check.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import warnings
from pathlib import Path
from types import MethodType

import torch
from accelerate.utils import DistributedDataParallelKwargs, convert_outputs_to_fp32, get_mixed_precision_context_manager
from torch import nn

from .configuration_cps import CPSConfig
from .errors import ConfigError
from .inference import make_eval_protocol
from .losses import OhemCrossEntropy, cross_entropy
from .methods import build_method
from .modeling_cps import CPSForSemanticSegmentation, UnknownBackboneError

CHECKPOINT_PATTERN = re.compile(r"^step_(\d+)$")


def model_config_from_args(args, class_names: list[str], ignore_index: int = 255) -> CPSConfig:
    """The exported network's config: architecture fields from the run, labels from the dataset."""
    return CPSConfig(
        backbone=args.backbone,
        output_stride=args.output_stride,
        multi_grid=list(args.multi_grid) if args.multi_grid else None,
        aspp_rates=list(args.aspp_rates),
        aspp_channels=args.aspp_channels,
        decoder_channels=args.decoder_channels,
        low_level_channels=args.low_level_channels,
        num_labels=len(class_names),
        id2label=dict(enumerate(class_names)),
        label2id={name: index for index, name in enumerate(class_names)},
        semantic_loss_ignore_index=ignore_index,
        # What the trainer evaluates with; scripts/evaluate_cps.py uses it by default.
        eval_protocol=make_eval_protocol(args.eval_mode, args.eval_crop_size or args.crop_size, args.eval_stride),
        **encoder_options(args),
    )


def encoder_options(args) -> dict:
    """CPSConfig fields of the encoder recipe, given only when set, so that the config of a run
    without them is exactly what it was before they existed."""
    options = {}
    backbone_kwargs = dict(args.backbone_kwargs or {})
    if args.drop_path_rate > 0:
        backbone_kwargs["drop_path_rate"] = args.drop_path_rate
    if backbone_kwargs:
        options["backbone_kwargs"] = backbone_kwargs
    if args.vit_feature_indices is not None:
        options["vit_feature_indices"] = list(args.vit_feature_indices)
    if args.decode_head != "deeplabv3plus":
        options["decode_head"] = args.decode_head
    return options


def strong_view_settings(args):
    """The weak-to-strong methods' strong views from the --strong_* flags; a bad value is one line naming them."""
    from .strong_views import StrongViewSettings

    try:
        return StrongViewSettings(
            color_jitter=tuple(args.strong_color_jitter), color_jitter_p=args.strong_color_jitter_p,
            grayscale_p=args.strong_grayscale_p, blur_p=args.strong_blur_p, blur_sigma=tuple(args.strong_blur_sigma),
            cutmix_p=args.strong_cutmix_p, cutmix_area=tuple(args.strong_cutmix_area))
    except (ValueError, TypeError) as error:
        raise ConfigError(f"--strong_*: {error}") from None


def method_from_args(args, class_names: list[str]):
    """The `--method` with every method flag applied: the one place flags become a method, so the trainer and the
    benchmarks that time its step (benchmarks/gpu_speed.py) cannot drift apart."""
    return build_method(
        args.method,
        sup_criterion=(
            OhemCrossEntropy(threshold=args.ohem_threshold, min_kept=args.ohem_min_kept,
                             images_per_group=args.ohem_images_per_group)
            if args.sup_loss == "ohem" else cross_entropy
        ),
        cps_weight=args.cps_weight,
        cps_weight_rampup_steps=args.cps_weight_rampup_steps,
        cps_weight_rampup_epochs=args.cps_weight_rampup_epochs,
        supervised_warmup_steps=args.supervised_warmup_steps,
        cps_on_labeled=args.cps_on_labeled,
        cps_on_unlabeled=args.cps_on_unlabeled,
        pseudo_label_threshold=args.pseudo_label_threshold,
        pseudo_label_normalize=args.pseudo_label_normalize,
        cutmix_num_boxes=args.cutmix_num_boxes,
        cutmix_area_range=args.cutmix_area_range,
        freeze_bn=args.freeze_bn,
        ema_decay=args.ema_decay,
        ema_teacher=args.ema_teacher,
        feature_dropout=args.feature_dropout,
        strong_views=strong_view_settings(args),
        ema_warmup=args.mt_ema_warmup,
        ema_buffers=args.mt_ema_buffers,
        consistency=args.mt_consistency,
        confidence_weighting=args.mt_confidence_weighting,
        student_noise_std=args.mt_noise_std,
        num_networks=args.num_networks,
        ncps_sum=args.ncps_sum,
        generator_seed=args.seed,
        class_names=class_names,  # names the per-class kept fractions of a thresholded run
        class_shares=args.erasure_alarm_fraction > 0,  # per-class shares for the erasure alarm
        class_aware_threshold=args.pseudo_label_class_aware,
        # Figure 7's "foreground" agreement leaves out background; Cityscapes' class 0 is road.
        background_index=0 if class_names[0].lower() in ("background", "_background_") else None,
    )


def per_device_batch_size(global_batch_size: int, num_processes: int, accumulation_steps: int) -> int:
    """The paper's batch (8 labeled + 8 unlabeled per step) on however many devices this run has."""
    share = num_processes * accumulation_steps
    if global_batch_size % share:
        raise ValueError(
            f"global_batch_size {global_batch_size} is not divisible by {num_processes} processes x "
            f"{accumulation_steps} accumulation steps"
        )
    return global_batch_size // share


def build_networks(
    config: CPSConfig, num_models: int, pretrained: str = "none", seed: int = 0, init_from: str | None = None
) -> list[nn.Module]:
    """CPS's perturbation: the same backbone weights in every network, a differently seeded head in each.

    `pretrained` is "timm" (Hub weights by timm name), a local checkpoint path, or "none".
    The backbone of network 1 is copied into the others, so they share it even from random init.
    `init_from` (a trained cps_hf model or step_N checkpoint, see `weights.init_networks_from`)
    replaces all of that, so `pretrained` is then not fetched at all.
    """
    from .weights import init_networks_from, load_backbone_weights

    networks = []
    for index in range(num_models):
        torch.manual_seed(seed * 1000 + index)  # head init differs per network and is reproducible
        try:
            networks.append(CPSForSemanticSegmentation(config))
        except UnknownBackboneError as error:
            raise ConfigError(f"--backbone: {error}") from None
    if init_from:
        init_networks_from(networks, init_from)
        return networks
    if pretrained not in ("none", "", None):
        load_backbone_weights(networks[0], True if pretrained == "timm" else pretrained)
    for network in networks[1:]:
        network.backbone.load_state_dict(networks[0].backbone.state_dict())
        network.config.backbone_pretrained_source = networks[0].config.backbone_pretrained_source
    return networks


def freeze_unreachable_parameters(network: nn.Module, size: int = 64) -> list[str]:
    """Freeze parameters that never reach the logits and return their names.

    timm's features_only HRNet, for one, still holds (and runs) branches for levels we do not
    tap; their parameters never get a gradient, and DDP (find_unused_parameters=False) then
    fails on the second step. One eval-mode pass on a blank image finds them; frozen parameters
    are left out of the optimizer and of DDP's gradient reduction.
    """
    was_training = network.training
    network.eval()
    network.zero_grad(set_to_none=True)
    device = next(network.parameters()).device
    network(pixel_values=torch.zeros(1, 3, size, size, device=device)).logits.sum().backward()
    unreachable = [name for name, p in network.named_parameters() if p.requires_grad and p.grad is None]
    for name, parameter in network.named_parameters():
        if name in unreachable:
            parameter.requires_grad_(False)
    network.zero_grad(set_to_none=True)
    network.train(was_training)
    return unreachable


def apply_backbone_options(networks: list[nn.Module], args) -> None:
    """--freeze_backbone and --gradient_checkpointing, on every network (the model implements both)."""
    for network in networks:
        if args.freeze_backbone:
            network.freeze_backbone()  # no gradient, eval mode: weights and BN statistics stay as loaded
        if args.gradient_checkpointing:
            try:
                network.set_backbone_gradient_checkpointing(True)
            except ValueError as error:  # an encoder timm cannot checkpoint: the user's flag, one line
                raise ConfigError(f"--gradient_checkpointing: {error}") from None


def parameter_count_lines(networks: list[nn.Module], names: list[str]) -> list[str]:
    """One log line per distinct parameter count (backbone, head, trainable; the model's
    `parameter_counts`): the networks of a CPS run share one architecture, so usually one line."""
    lines: dict[tuple, list[str]] = {}
    for network, name in zip(networks, names):
        lines.setdefault(tuple(network.parameter_counts().items()), []).append(name)
    return [
        f"{', '.join(members)}: " + ", ".join(f"{key} {value / 1e6:.2f}M" for key, value in counts) + " parameters"
        for counts, members in lines.items()
    ]


def uses_sync_batchnorm(accelerator) -> bool:
    """SyncBN on multi-GPU runs only (it raises on CPU)."""
    return accelerator.num_processes > 1 and accelerator.device.type == "cuda"


def maybe_convert_sync_batchnorm(networks: list[nn.Module], accelerator) -> list[nn.Module]:
    """SyncBN on multi-GPU runs only (it raises on CPU); timm's converter keeps its fused BN+act layers."""
    if uses_sync_batchnorm(accelerator):
        from timm.layers import convert_sync_batchnorm

        return [convert_sync_batchnorm(network) for network in networks]
    return networks


def autocast_follower(network: nn.Module, accelerator) -> nn.Module:
    """Under --mixed_precision, the autocast wrapper accelerate gives the networks it prepares, for one it does not.

    An EMA teacher is not prepared (no optimizer, no DDP, and its checkpoint entry is its own; prepare_model's
    evaluation mode would add it to the models save_state writes), so without this its no-grad forwards ran in
    fp32 in a bf16 run: a quarter of UniMatch V2's forward images, half of CutMix-Seg's. Same wrapper as
    prepare_model's (autocast around forward, floating outputs back to fp32), so `unwrap_model(...,
    keep_fp32_wrapper=False)` removes it. A no-op in full precision: fp32 runs are unchanged."""
    if not accelerator.native_amp:
        return network
    network._original_forward = network.forward
    autocast = get_mixed_precision_context_manager(accelerator.native_amp, accelerator.autocast_handler)
    network.forward = MethodType(autocast(network.forward.__func__), network)
    network.forward = MethodType(convert_outputs_to_fp32(network.forward.__func__), network)
    return network


def step_folders(output_dir: str | Path) -> list[Path]:
    """The step_N checkpoint folders in output_dir, oldest step first."""
    found = ((int(m.group(1)), p) for p in Path(output_dir).glob("step_*") if (m := CHECKPOINT_PATTERN.match(p.name)))
    return [path for _, path in sorted(found)]


COMPLETE_MARKER = "checkpoint_complete.json"


def mark_checkpoint_complete(path: str | Path, step: int) -> None:
    """Written by the main process after every rank has finished `save_state`: a crash while
    saving leaves a folder without it, which `find_checkpoint` and pruning then pass over."""
    temporary = Path(path) / f".{COMPLETE_MARKER}.tmp"
    temporary.write_text(json.dumps({"step": step}) + "\n")
    temporary.replace(Path(path) / COMPLETE_MARKER)


def complete_step_folders(output_dir: str | Path) -> list[Path]:
    """The step_N folders whose save finished, oldest first. Folders from before completion markers
    existed count as complete when no folder has a marker."""
    folders = step_folders(output_dir)
    marked = [path for path in folders if (path / COMPLETE_MARKER).is_file()]
    return marked if marked else folders


def find_checkpoint(output_dir: str | Path, resume: str) -> Path:
    """`resume` is a step_N folder or "latest" (the highest completely saved step_N in output_dir)."""
    if resume != "latest":
        path = Path(resume)
        if not path.is_dir():
            raise ConfigError(f"--resume_from_checkpoint {resume}: no such checkpoint folder (give a step_N folder "
                              "or 'latest')")
        run_uses_markers = any((folder / COMPLETE_MARKER).is_file() for folder in step_folders(path.parent))
        if run_uses_markers and not (path / COMPLETE_MARKER).is_file():
            raise ConfigError(f"--resume_from_checkpoint {resume}: its save did not finish (no {COMPLETE_MARKER}); "
                              "give an earlier step_N or 'latest'")
        return path
    candidates = complete_step_folders(output_dir)
    if not candidates:
        raise ConfigError(f"--resume_from_checkpoint latest: no completely saved step_N folder in {output_dir}")
    unfinished = [path.name for path in step_folders(output_dir) if checkpoint_step(path) > checkpoint_step(candidates[-1])]
    if unfinished:
        warnings.warn(f"skipping checkpoint folder(s) {unfinished} in {output_dir}: their save did not finish; "
                      f"resuming from {candidates[-1].name}", stacklevel=2)
    return candidates[-1]


def checkpoint_step(path: Path) -> int:
    match = CHECKPOINT_PATTERN.match(Path(path).name)
    if not match:
        raise ValueError(f"checkpoint folder {path} is not named step_N")
    return int(match.group(1))


def prune_checkpoints(output_dir: str | Path, keep: int | None) -> None:
    """Keep the newest `keep` completely saved checkpoints; drop older ones and unfinished saves
    older than the newest complete one."""
    if not keep:
        return
    complete = complete_step_folders(output_dir)
    if not complete:
        return
    kept = set(complete[-keep:])
    newest = checkpoint_step(complete[-1])
    for path in step_folders(output_dir):
        if path not in kept and checkpoint_step(path) < newest:
            shutil.rmtree(path, ignore_errors=True)


def mean_logs(records: list[dict[str, float]]) -> dict[str, float]:
    """Average step logs over the micro-batches of one optimizer step: each key over the micro-batches
    that logged it (a per-class ratio exists only where that class was predicted)."""
    keys = set().union(*records)
    return {key: sum(values) / len(values)
            for key in sorted(keys) for values in [[r[key] for r in records if key in r]]}


def reduce_logs(logs: dict[str, float], accelerator) -> dict[str, float]:
    """Mean of the step logs over all processes, so the logged loss is the whole batch's, not rank 0's.

    Ranks may log different keys (a per-class ratio of a class only one rank predicted): the union of
    the keys is reduced, each key averaged over the ranks that have a number for it (NaN where none has).
    """
    if accelerator.num_processes == 1:
        return logs
    from accelerate.utils import gather_object

    keys = sorted(set().union(*gather_object([sorted(logs)])))
    if not keys:
        return logs
    values = torch.tensor([logs.get(key, float("nan")) for key in keys], dtype=torch.float64, device=accelerator.device)
    present = ~torch.isnan(values)
    totals = accelerator.reduce(torch.where(present, values, torch.zeros_like(values)), reduction="sum")
    counts = accelerator.reduce(present.to(values.dtype), reduction="sum")
    return dict(zip(keys, (totals / counts).tolist()))  # 0 / 0: NaN, as every rank's NaN


def eval_scalars(results: dict, class_names: list[str]) -> dict[str, float]:
    """Scalar view of evaluation results for trackers and log.jsonl: the summary numbers plus
    one `eval_iou/<class>` per class (NaN, i.e. absent from both prediction and truth, skipped)."""
    scalars = {k: float(v) for k, v in results.items() if isinstance(v, (int, float))}
    for name, iou in zip(class_names, results.get("eval_per_category_iou", [])):
        if iou == iou:
            scalars[f"eval_iou/{name}"] = float(iou)
    return scalars


class TrainProgress:
    """The step counter and best score, saved with every accelerate checkpoint."""

    def __init__(self):
        self.step = 0
        self.best_mean_iou = float("nan")
        self.best_step = -1
        self.nonfinite_skipped = 0  # steps skipped for a NaN/inf loss (--skip_nonfinite_steps)

    def state_dict(self) -> dict:
        return {"step": self.step, "best_mean_iou": self.best_mean_iou, "best_step": self.best_step,
                "nonfinite_skipped": self.nonfinite_skipped}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])
        self.best_mean_iou = float(state["best_mean_iou"])
        self.best_step = int(state["best_step"])
        self.nonfinite_skipped = int(state.get("nonfinite_skipped", 0))  # absent in older checkpoints

    def update_best(self, mean_iou: float, step: int) -> bool:
        if self.best_step < 0 or mean_iou > self.best_mean_iou:
            self.best_mean_iou, self.best_step = float(mean_iou), step
            return True
        return False


class JsonlLog:
    """One JSON object per logged step in output_dir/log.jsonl (what scripts/make_figures.py plots)."""

    def __init__(self, path: str | Path, enabled: bool):
        self.path = Path(path)
        self.enabled = enabled

    def write(self, record: dict) -> None:
        if self.enabled:
            with self.path.open("a") as handle:
                handle.write(json.dumps(record, default=jsonable) + "\n")

    def truncate_after(self, step: int) -> None:
        """On resume, drop records newer than the checkpoint so the log tells one consistent story."""
        if not (self.enabled and self.path.exists()):
            return
        kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line).get("step", 0) <= step]
        self.path.write_text("".join(line + "\n" for line in kept))


def jsonable(value):
    """`json.dumps(default=...)`: arrays and tensors as lists, anything else as its string."""
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def ddp_kwargs() -> DistributedDataParallelKwargs:
    """DDP without its start-of-forward buffer broadcast.

    A CPS step runs each network several times before one backward (labelled, unlabelled, CutMix
    passes). DDP's broadcast writes the BN running statistics in place at every forward, and some
    torch versions (2.11 was seen) keep those tensors for BN's backward, so the backward then fails
    with "modified by an inplace operation". With SyncBN the running statistics agree across ranks
    anyway; `broadcast_buffers_from_main` makes them identical before evaluation and export.
    """
    return DistributedDataParallelKwargs(broadcast_buffers=False)


def broadcast_buffers_from_main(networks: list[nn.Module], accelerator) -> None:
    """Copy rank 0's buffers (BN running statistics) to every rank, so that all ranks evaluate and
    export the same model. No-op in a single process."""
    if accelerator.num_processes <= 1:
        return
    for network in networks:
        for buffer in accelerator.unwrap_model(network).buffers():
            torch.distributed.broadcast(buffer.data, src=0)


def parameter_fingerprint(networks: list[nn.Module]) -> str:
    """A hash of every parameter and buffer: equal on all DDP ranks when training stayed in sync.

    Take it after `broadcast_buffers_from_main`: without SyncBN each rank updates its BN running
    statistics from its own batches, so before that broadcast they legitimately differ.
    """
    digest = hashlib.sha256()
    for network in networks:
        for name, tensor in sorted([*network.named_parameters(), *network.named_buffers()], key=lambda item: item[0]):
            digest.update(name.encode())
            digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def check_run_settings(args, accelerator, num_labeled: int) -> None:
    """Refuse, before anything is written, settings that cannot do what they say."""
    if args.mixed_precision == "fp16" and accelerator.device.type == "cpu":
        raise ConfigError(
            "--mixed_precision fp16: this run is on the CPU, where fp16 autocast does not run (it would train in "
            "fp32 while the config says fp16); use --mixed_precision bf16 or no, or run on a GPU"
        )
    per_step = args.per_device_train_batch_size * accelerator.num_processes
    if per_step > num_labeled:
        raise ConfigError(
            f"--per_device_train_batch_size {args.per_device_train_batch_size} x {accelerator.num_processes} "
            f"process(es) asks for {per_step} labeled images per step, but the labeled set has {num_labeled}: "
            "every batch would repeat labeled images; lower the batch size or label more images (--labeled)"
        )
    if args.per_device_train_batch_size == 1 and not uses_sync_batchnorm(accelerator):
        # Every method forwards the labeled batch on its own; the ASPP image-pooling branch then
        # normalises one 1x1 value per channel, which BatchNorm cannot do in training mode.
        source = (f"--global_batch_size {args.global_batch_size} gives 1 labeled image per device and micro-batch"
                  if args.global_batch_size else "--per_device_train_batch_size 1")
        raise ConfigError(
            f"{source}: the DeepLabv3+ head's image-pooling BatchNorm cannot train on one image per device without "
            "SyncBN (only multi-GPU runs use it); use a per-device batch of at least 2"
        )


def check_schedule(args, max_train_steps: int) -> None:
    """The warm-up must end before training does (known once the steps per epoch are)."""
    if args.warmup_steps >= max_train_steps:
        raise ConfigError(f"--warmup_steps {args.warmup_steps} must be below the run's {max_train_steps} training steps")
