"""The method contract and what every method shares: the output type, step logs, the lambda
schedule, input checks, the supervised loss, agreement logs, and the registry.

The training loop is the same for every method: it calls ``method.init_networks(networks)`` and
``method.set_steps_per_epoch(n)`` once, then per step ``method(models, batch, step)``,
back-propagates ``output.loss``, logs ``output.logs``, steps the optimizer over the first
``trained_count`` networks and then calls ``method.after_optimizer_step(networks, step)``. A
method owns the forward passes, the losses and the per-step logs; it never touches the optimizer.

Batch layout::

    {"labeled": {"pixel_values": (B, 3, H, W), "labels": (B, H, W)},
     "unlabeled": [{"pixel_values": (B_u, 3, H, W)}, ...]}   # num_unlabeled_streams entries

`models` is a list of callables (plain or DDP-wrapped) with ``model(pixel_values=x).logits``
giving (B, C, H, W) logits at the input size.
"""

from __future__ import annotations

import inspect
import math
import re
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from ..cutmix import box_mask
from ..errors import ConfigError
from ..losses import agreement_counts, cross_entropy, pseudo_labels
from .class_shares import ClassAwareThreshold, log_class_shares

PSEUDO_LABEL_NORMALIZATIONS = ("valid", "kept")
NONE_IS_A_CHOICE = frozenset({"background_index"})  # options whose None means "none", not "the default"


@dataclass
class MethodOutput:
    """The loss to back-propagate and the step's scalar logs (plain floats)."""

    loss: torch.Tensor
    logs: dict[str, float] = field(default_factory=dict)


def sigmoid_rampup(step: int, rampup_steps: int) -> float:
    """exp(-5 (1 - t)^2) with t = step / rampup_steps clipped to [0, 1]; 1 when rampup_steps == 0."""
    if rampup_steps <= 0:
        return 1.0
    t = min(max(step / rampup_steps, 0.0), 1.0)
    return math.exp(-5.0 * (1.0 - t) ** 2)


class StepLogs:
    """Collects tensor logs and turns them into floats with a single device-to-host copy."""

    def __init__(self):
        self._tensors: dict[str, torch.Tensor] = {}
        self._floats: dict[str, float] = {}
        self._counts: dict[str, tuple[torch.Tensor, torch.Tensor, list[str]]] = {}

    def add(self, name: str, value: torch.Tensor | float) -> None:
        if isinstance(value, torch.Tensor):
            self._tensors[name] = value.detach().float().reshape(())
        else:
            self._floats[name] = float(value)

    def add_agreement(self, name: str, predictions_1, predictions_2, ignore_mask=None) -> None:
        agree, counted = agreement_counts(predictions_1, predictions_2, ignore_mask)
        self.add(name, agree.float() / counted.float())  # NaN when no pixel is counted

    def add_counts(self, name: str, numerators: torch.Tensor, denominators: torch.Tensor, labels: Sequence[str]) -> None:
        """Per-class ratios, summed over calls with the same `name` (e.g. every network's pseudo labels):
        logged as ``name/<label>`` = sum of numerators / sum of denominators, for classes whose
        denominator is not 0 (a class nobody predicted has no ratio)."""
        numerators, denominators = numerators.detach().float(), denominators.detach().float()
        if name in self._counts:
            before = self._counts[name]
            numerators, denominators = before[0] + numerators, before[1] + denominators
        self._counts[name] = (numerators, denominators, list(labels))

    def to_floats(self) -> dict[str, float]:
        logs = dict(self._floats)
        if self._tensors:
            values = torch.stack(list(self._tensors.values())).tolist()
            logs.update(zip(self._tensors.keys(), values))
        for name, (numerators, denominators, labels) in self._counts.items():
            for label, numerator, denominator in zip(labels, numerators.tolist(), denominators.tolist()):
                if denominator > 0:
                    logs[f"{name}/{label}"] = numerator / denominator
        return logs


class KeptFractions:
    """Stands in for the step logs in `Method.pseudo_targets` when several networks make pseudo labels:
    forwards each network's kept fraction (``pseudo_kept_{suffix}_k``) and its per-class counts, and
    remembers the fractions, so that their mean over the networks can be logged as ``pseudo_kept_{suffix}``
    (the networks see the same images, so that mean is the kept fraction of all their pseudo labels)."""

    def __init__(self, logs: StepLogs):
        self.logs = logs
        self.values: list[torch.Tensor] = []

    def add(self, name: str, value) -> None:
        self.logs.add(name, value)
        self.values.append(torch.as_tensor(value).detach().float().reshape(()))

    def add_counts(self, name, numerators, denominators, labels) -> None:
        self.logs.add_counts(name, numerators, denominators, labels)

    def log_mean(self, name: str) -> None:
        if self.values:  # nothing was logged when the threshold is 0
            self.logs.add(name, torch.stack([v.to(self.values[0].device) for v in self.values]).mean())


class Method:
    """Base class: checks the inputs, holds the CPS weight schedule, leaves the step to subclasses.

    Args:
        sup_criterion: the supervision loss, ``(logits, labels) -> scalar`` (CE or OHEM).
        cps_weight: lambda of equation 6 (ignored by ``supervised``).
        cps_weight_rampup_steps: if > 0, lambda is multiplied by a sigmoid ramp-up over that many
            steps (counted after the warm-up). The paper's presets do not use it.
        cps_weight_rampup_epochs: the same ramp-up given in epochs (passes over the unlabeled set),
            turned into steps by `set_steps_per_epoch`; None: the method's `default_rampup_epochs`
            (3 for the mean teacher, as PixelSSL; 0 elsewhere), unless `cps_weight_rampup_steps` is set.
        supervised_warmup_steps: lambda is 0 for the first N steps. The paper's presets do not use it.
        ignore_index: label value of unlabelled pixels.
        background_index: class left out of ``agreement_*_fg`` (Figure 7 ignores background);
            None to skip that log (e.g. Cityscapes, which has no background class).
        generator_seed: seed of the CutMix masks; the masks of a call depend on (seed, step, rank,
            micro_step) only, so a resumed run draws the same masks.
        pseudo_label_threshold: pseudo-labelled pixels whose softmax confidence is below it are
            ignored (0: off, the paper).
        cutmix_num_boxes / cutmix_area_range: the box mask of the CutMix methods (boxes per mask, and
            the range of the area they cover together); None: the method's own (CPS's 3 boxes of
            0.25-0.5, CutMix-Seg's 1 box of 0.5).
        class_names: names for the per-class kept fractions of a thresholded run (``pseudo_kept_u/<name>``);
            None: the class indices.
        freeze_bn: keep the encoder's BatchNorm layers in eval mode (running statistics fixed, affine
            parameters still trained), in every network; None: the method's default (on for
            CutMix-Seg, whose scripts all pass --freeze_bn; off elsewhere).
        pseudo_label_normalize: what a thresholded pseudo-label loss is divided by: "valid" (every
            pixel that has a pseudo label before thresholding, as UniMatch's ``loss.sum() /
            (ignore_mask != 255).sum()``: the dropped pixels count as zeros, so lambda keeps its
            meaning whatever the kept fraction) or "kept" (only the confident pixels, a plain mean
            with ignore_index; its effective lambda grows as 1 / kept fraction). No effect at
            threshold 0.
        class_shares: log each class's share of the labeled pixels and of the kept pseudo labels on unlabeled
            images every step (``labeled_share/<class>``, ``pseudo_share_u/<class>``), which the trainer's
            erasure alarm compares (`cps_hf.erasure_alarm`). Needs `class_names`.
        class_aware_threshold: FlexMatch-style per-class bars under `pseudo_label_threshold` for classes the
            network has learned less (`class_shares.ClassAwareThreshold`); needs a threshold > 0.
    """

    name: str = "base"
    num_models: int = 1  # networks the run builds
    num_trained: int | None = None  # the first num_trained are optimised, the rest follow them (EMA); None: all
    num_unlabeled_streams: int = 0  # unlabeled batches per step (CutMix forms mix two)
    network_names: tuple[str, ...] = ()  # names for --export_network (default: network_1, network_2, ...)
    default_export: str = "network_1"  # what model/ holds unless --export_network says otherwise
    default_rampup_epochs: float = 0.0  # sigmoid ramp-up of lambda, in epochs, unless the user sets one
    default_cutmix_boxes: tuple[int, tuple[float, float]] = (3, (0.25, 0.5))  # CPS's box mask
    default_freeze_bn: bool = False  # encoder BatchNorms in eval mode (CutMix-Seg's --freeze_bn)
    default_cps_weight: float = 1.5  # lambda when the trainer's --cps_weight is unset (the original's VOC CPS value)
    default_same_image: bool = False  # whether the two unlabeled streams draw the same images (--cutmix_same_image)

    def __init__(
        self,
        sup_criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        cps_weight: float = 0.0,
        cps_weight_rampup_steps: int = 0,
        cps_weight_rampup_epochs: float | None = None,
        supervised_warmup_steps: int = 0,
        ignore_index: int = 255,
        background_index: int | None = 0,
        generator_seed: int = 0,
        pseudo_label_threshold: float = 0.0,
        pseudo_label_normalize: str = "valid",
        cutmix_num_boxes: int | None = None,
        cutmix_area_range: Sequence[float] | None = None,
        freeze_bn: bool | None = None,
        class_names: Sequence[str] | None = None,
        class_shares: bool = False,
        class_aware_threshold: bool = False,
    ):
        if cps_weight < 0:
            raise ValueError(f"cps_weight must be >= 0, got {cps_weight}")
        if cps_weight_rampup_steps < 0 or supervised_warmup_steps < 0:
            raise ValueError(
                "cps_weight_rampup_steps and supervised_warmup_steps must be >= 0, got "
                f"{cps_weight_rampup_steps} and {supervised_warmup_steps}"
            )
        self.sup_criterion = sup_criterion
        self.cps_weight = float(cps_weight)
        self.cps_weight_rampup_steps = int(cps_weight_rampup_steps)
        if cps_weight_rampup_epochs is not None and cps_weight_rampup_steps:
            raise ValueError("give the lambda ramp-up once: cps_weight_rampup_steps or cps_weight_rampup_epochs")
        if cps_weight_rampup_epochs is None:
            cps_weight_rampup_epochs = 0.0 if cps_weight_rampup_steps else self.default_rampup_epochs
        if cps_weight_rampup_epochs < 0:
            raise ValueError(f"cps_weight_rampup_epochs must be >= 0, got {cps_weight_rampup_epochs}")
        self.cps_weight_rampup_epochs = float(cps_weight_rampup_epochs)
        self.steps_per_epoch: int | None = None
        self.freeze_bn = self.default_freeze_bn if freeze_bn is None else bool(freeze_bn)
        self.class_names = list(class_names) if class_names is not None else None
        default_boxes, default_area = self.default_cutmix_boxes
        self.cutmix_num_boxes = int(default_boxes if cutmix_num_boxes is None else cutmix_num_boxes)
        self.cutmix_area_range = tuple(float(v) for v in (default_area if cutmix_area_range is None else cutmix_area_range))
        if self.cutmix_num_boxes < 1:
            raise ValueError(f"cutmix_num_boxes must be >= 1, got {self.cutmix_num_boxes}")
        if len(self.cutmix_area_range) != 2 or not 0 < self.cutmix_area_range[0] <= self.cutmix_area_range[1] <= 1:
            raise ValueError(f"cutmix_area_range needs two values 0 < low <= high <= 1, got {list(self.cutmix_area_range)}")
        self.supervised_warmup_steps = int(supervised_warmup_steps)
        self.ignore_index = ignore_index
        self.background_index = background_index
        self.generator_seed = int(generator_seed)
        if not 0 <= pseudo_label_threshold < 1:
            raise ValueError(f"pseudo_label_threshold must be in [0, 1), got {pseudo_label_threshold}")
        self.pseudo_label_threshold = float(pseudo_label_threshold)
        if pseudo_label_normalize not in PSEUDO_LABEL_NORMALIZATIONS:
            raise ValueError(f"pseudo_label_normalize must be one of {', '.join(PSEUDO_LABEL_NORMALIZATIONS)}, "
                             f"got {pseudo_label_normalize!r}")
        self.pseudo_label_normalize = pseudo_label_normalize
        if class_shares and not self.class_names:
            raise ValueError("class_shares needs class_names")
        self.class_shares = bool(class_shares)
        if class_aware_threshold and self.pseudo_label_threshold <= 0:
            raise ValueError("class_aware_threshold lowers the bar of pseudo_label_threshold per class: set a threshold > 0")
        self.class_threshold = ClassAwareThreshold() if class_aware_threshold else None

    def checkpoint_state(self) -> list:
        """Objects with state_dict / load_state_dict the trainer saves in its checkpoints (a resumed run goes on
        with them): the class-aware threshold's counts, when on."""
        return [self.class_threshold] if self.class_threshold is not None else []

    def set_steps_per_epoch(self, steps_per_epoch: int) -> None:
        """Called by the trainer once the data are known: an epoch-based ramp-up becomes steps."""
        self.steps_per_epoch = int(steps_per_epoch)
        if self.cps_weight_rampup_epochs > 0:
            self.cps_weight_rampup_steps = max(1, round(self.cps_weight_rampup_epochs * self.steps_per_epoch))

    def cps_weight_at(self, step: int) -> float:
        """lambda at `step`: 0 during the supervised warm-up, then the (optionally ramped) weight."""
        if self.cps_weight_rampup_epochs > 0 and self.steps_per_epoch is None:
            raise RuntimeError(f"method {self.name!r}: its lambda ramp-up is {self.cps_weight_rampup_epochs:g} "
                               "epochs; call set_steps_per_epoch first (or pass cps_weight_rampup_epochs=0)")
        if step < self.supervised_warmup_steps:
            return 0.0
        return self.cps_weight * sigmoid_rampup(step - self.supervised_warmup_steps, self.cps_weight_rampup_steps)

    def generator(self, step: int, rank: int = 0, micro_step: int = 0) -> torch.Generator:
        """A CPU generator seeded from (generator_seed, step, rank, micro_step) alone."""
        key = [self.generator_seed, int(step), int(rank), int(micro_step)]
        seed = np.random.SeedSequence(key).generate_state(1)[0]
        return torch.Generator().manual_seed(int(seed))

    # -- what the loop asks of every method ----------------------------------------------------

    @classmethod
    def from_options(cls, sup_criterion, **options) -> "Method":
        """Build from the trainer's method options, taking those this class's __init__ (or a base's)
        names; an option given as None keeps the method's own default, except where None is itself a choice
        (`NONE_IS_A_CHOICE`: no background class, so no `agreement_*_fg` log)."""
        accepted = set()
        for klass in cls.__mro__:
            if "__init__" in vars(klass):
                accepted |= set(inspect.signature(klass.__init__).parameters)
        given = {k: v for k, v in options.items() if k in accepted and (v is not None or k in NONE_IS_A_CHOICE)}
        given.setdefault("cps_weight", cls.default_cps_weight)  # the trainer's lambda, unset: the method's own
        return cls(sup_criterion, **given)

    @property
    def trained_count(self) -> int:
        return self.num_models if self.num_trained is None else self.num_trained

    def names(self) -> tuple[str, ...]:
        return self.network_names or tuple(f"network_{k}" for k in range(1, self.num_models + 1))

    def export_index(self, name: str | None = None) -> int:
        """Index of the network called `name` (None: the method's default export)."""
        names = self.names()
        name = name or self.default_export
        if name not in names:
            raise ConfigError(f"--export_network {name}: method {self.name!r} has networks {', '.join(names)}")
        return names.index(name)

    def init_networks(self, networks: Sequence[torch.nn.Module]) -> None:
        """Called once on the freshly built networks, before the optimizer sees them (e.g. a mean
        teacher starts as a copy of its student). Here: `freeze_bn`, if on. Subclasses call it."""
        if not self.freeze_bn:
            return
        for network in networks:
            freeze = getattr(network, "freeze_backbone_batchnorm", None)
            if freeze is None:
                raise ValueError(f"method {self.name!r}: freeze_bn needs networks with freeze_backbone_batchnorm(), "
                                 f"got {type(network).__name__}")
            freeze()

    def after_optimizer_step(self, networks: Sequence[torch.nn.Module], step: int) -> None:
        """Called after every optimizer update (not after a skipped one), e.g. for an EMA teacher.
        `networks` are the unwrapped modules. Default: nothing."""

    def __call__(
        self, models: Sequence[Callable], batch: dict, step: int, rank: int = 0, micro_step: int = 0
    ) -> MethodOutput:
        """One step's loss and logs.

        `step` is the optimizer step (it drives the lambda schedule); `rank` the process index and
        `micro_step` the index of the micro-batch within a gradient-accumulation step, so every
        call of a run draws its own CutMix masks.
        """
        self._check_inputs(models, batch)
        return self.compute(models, batch, step, self.generator(step, rank, micro_step))

    def compute(self, models, batch, step: int, generator: torch.Generator) -> MethodOutput:
        raise NotImplementedError

    # -- helpers shared by the methods -------------------------------------------------------

    def cutmix_mask(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One box mask per image of `images` (B, C, H, W), from `generator`, with this method's boxes."""
        batch_size, _, height, width = images.shape
        return box_mask(batch_size, height, width, generator=generator, prop_range=self.cutmix_area_range,
                        n_boxes=self.cutmix_num_boxes, device=images.device)

    def pseudo_targets(self, logits: torch.Tensor, predictions: torch.Tensor | None = None,
                       logs: "StepLogs | None" = None, log_name: str = "pseudo_kept_u",
                       count_for_bars: bool = True) -> torch.Tensor:
        """Pseudo labels for a loss: the argmax (`predictions`, if already computed), and with
        `pseudo_label_threshold` > 0 every pixel whose softmax confidence is below it set to
        `ignore_index`. The kept fraction goes to `logs[log_name]`, and per class (of the pixels whose
        argmax is that class, the share kept; summed over the networks of a step) to
        ``<log_name without a trailing _k>/<class>``, so a threshold that starves a class shows. Threshold
        0 returns the argmax itself, so the paper's methods are unchanged. `count_for_bars` False: the
        class-aware bars use these predictions but do not count them (a method that labels the same weak
        predictions several times in one step counts them once)."""
        predictions = pseudo_labels(logits) if predictions is None else predictions
        unlabeled = logs is not None and log_name.startswith("pseudo_kept_u")
        if self.pseudo_label_threshold <= 0:
            if self.class_shares and unlabeled:
                log_class_shares(logs, "pseudo_share_u", predictions, self.class_names, self.ignore_index)
            return predictions
        with torch.no_grad():
            confidence = logits.detach().float().softmax(dim=1).amax(dim=1)
            if self.class_threshold is not None:
                bars = self.class_threshold.thresholds(self.pseudo_label_threshold, logits.shape[1], logits.device)
                confident = confidence >= bars[predictions]
                if count_for_bars:
                    self.class_threshold.update(predictions, confidence, self.pseudo_label_threshold,
                                                logits.shape[1])
            else:
                confident = confidence >= self.pseudo_label_threshold
            if self.class_shares and unlabeled:
                log_class_shares(logs, "pseudo_share_u", predictions.masked_fill(~confident, self.ignore_index),
                                 self.class_names, self.ignore_index)
            if logs is not None:
                logs.add(log_name, confident.float().mean())
                num_classes = logits.shape[1]
                labels = self.class_names if self.class_names and len(self.class_names) == num_classes \
                    else [str(c) for c in range(num_classes)]
                logs.add_counts(re.sub(r"_\d+$", "", log_name),
                                torch.bincount(predictions[confident].flatten(), minlength=num_classes),
                                torch.bincount(predictions.flatten(), minlength=num_classes), labels)
            return predictions.masked_fill(~confident, self.ignore_index)

    def pseudo_denominator(self, targets: torch.Tensor) -> int | None:
        """What a pseudo-label cross-entropy on `targets` divides its sum by: None (the kept pixels, the
        plain mean) unless a threshold is on and `pseudo_label_normalize` is "valid"; then every pixel of
        `targets`, since an argmax pseudo label exists at every pixel before thresholding (UniMatch also
        leaves out the padding of unlabeled crops; our unlabeled crops carry no padding mask)."""
        if self.pseudo_label_threshold > 0 and self.pseudo_label_normalize == "valid":
            return targets.numel()
        return None

    def pseudo_cross_entropy(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy against pseudo labels from `pseudo_targets`, normalised per `pseudo_label_normalize`."""
        return cross_entropy(logits, targets, self.ignore_index, self.pseudo_denominator(targets))

    def _check_inputs(self, models, batch) -> None:
        if len(models) != self.num_models:
            raise ValueError(f"method {self.name!r} needs {self.num_models} model(s), got {len(models)}")
        if "labeled" not in batch:
            raise KeyError(f"method {self.name!r}: batch has no 'labeled' entry (keys: {sorted(batch)})")
        labeled = batch["labeled"]
        for key in ("pixel_values", "labels"):
            if key not in labeled:
                raise KeyError(f"method {self.name!r}: batch['labeled'] has no {key!r} (keys: {sorted(labeled)})")
        unlabeled = batch.get("unlabeled") or []
        if len(unlabeled) != self.num_unlabeled_streams:
            raise ValueError(
                f"method {self.name!r} needs {self.num_unlabeled_streams} unlabeled stream(s) in "
                f"batch['unlabeled'], got {len(unlabeled)}"
            )
        for i, stream in enumerate(unlabeled):
            if "pixel_values" not in stream:
                raise KeyError(f"method {self.name!r}: batch['unlabeled'][{i}] has no 'pixel_values'")

    def _init_cross_switches(self, on_labeled: bool, on_unlabeled: bool, term: str) -> None:
        """Table 4's switches, for methods whose unsupervised term has a labeled and an unlabeled part.
        With the unlabeled part off, no unlabeled batch is loaded or forwarded."""
        if not on_labeled and not on_unlabeled:
            raise ValueError(
                f"method {self.name!r}: cps_on_labeled and cps_on_unlabeled cannot both be off (that leaves "
                f"no {term}: use --method supervised)"
            )
        self.cps_on_labeled = bool(on_labeled)
        self.cps_on_unlabeled = bool(on_unlabeled)
        if not self.cps_on_unlabeled:
            self.num_unlabeled_streams = 0

    @staticmethod
    def _forward_labeled_and_unlabeled(models, batch, use_unlabeled: bool) -> tuple[list, list]:
        """Each network's logits on the labeled batch, then (if used) on the unlabeled one, network by
        network: the original's forward order (separate BN batch statistics per batch)."""
        logits_l, logits_u = [], []
        for model in models:
            logits_l.append(logits_of(model, batch["labeled"]["pixel_values"]))
            if use_unlabeled:
                logits_u.append(logits_of(model, batch["unlabeled"][0]["pixel_values"]))
        return logits_l, logits_u

    def _supervised_losses(self, logits_per_model, labels, logs: StepLogs) -> torch.Tensor:
        """L_s of equation 4: the sum over networks of each one's supervision loss."""
        losses = [self.sup_criterion(logits, labels) for logits in logits_per_model]
        if self.class_shares:
            log_class_shares(logs, "labeled_share", labels, self.class_names, self.ignore_index)
        if len(losses) > 1:
            for k, loss in enumerate(losses, start=1):
                logs.add(f"loss_sup_{k}", loss)
        total = sum(losses[1:], losses[0])
        logs.add("loss_sup", total)
        return total

    def _log_agreement(self, name: str, predictions_1, predictions_2, logs: StepLogs) -> None:
        """Figure 7's overlap ratio; `_fg` leaves out pixels both networks call background."""
        logs.add_agreement(name, predictions_1, predictions_2)
        if self.background_index is not None:
            background = (predictions_1 == self.background_index) & (predictions_2 == self.background_index)
            logs.add_agreement(f"{name}_fg", predictions_1, predictions_2, background)


def pixel_weighted(loss_l, logits_l: torch.Tensor, loss_u, logits_u: torch.Tensor):
    """A term on labeled and unlabeled images as one mean over all their pixels, as the original's CE
    over the concatenated logits: (n_l L^l + n_u L^u) / (n_l + n_u). Either part may be None (off)."""
    if loss_l is not None and loss_u is not None:
        n_l, n_u = logits_l[:, 0].numel(), logits_u[:, 0].numel()
        return (n_l * loss_l + n_u * loss_u) / (n_l + n_u)
    return loss_u if loss_u is not None else loss_l


def logits_of(model, pixel_values: torch.Tensor) -> torch.Tensor:
    return model(pixel_values=pixel_values).logits


def has_stochastic_layers(network: torch.nn.Module) -> bool:
    """Whether two train-mode passes of `network` on the same input can differ: a dropout layer with
    p > 0 or a drop-path (stochastic depth, timm's DropPath) with a rate > 0."""
    from timm.layers import DropPath

    for module in network.modules():
        if isinstance(module, torch.nn.modules.dropout._DropoutNd) and module.p > 0:
            return True
        if isinstance(module, DropPath) and module.drop_prob > 0:
            return True
    return False




# ---------------------------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------------------------

METHODS: dict[str, type[Method]] = {}


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: makes the method buildable by its `name` (and a `--method` choice)."""
    METHODS[cls.name] = cls
    return cls


def build_method(name: str, sup_criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], **options) -> Method:
    """Build a registered method by name; `options` are the trainer's method options (cps_weight,
    cps_on_labeled, ...), each method taking those it knows."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}")
    return METHODS[name].from_options(sup_criterion, **options)
