"""Weak-to-strong consistency: FixMatch and UniMatch as UniMatch's code runs them, and CPS across strong views.

Each network's prediction on the weak view (the usual crop, scale and flip) gives pseudo labels for its
prediction on a strong view of the same geometry (colour jitter, grayscale, blur and a CutMix box:
`cps_hf.strong_views`). Read from `LiheYoung/UniMatch` (`fixmatch.py`, `unimatch.py`, `dataset/semi.py`)
and `LiheYoung/UniMatch-V2` (`fixmatch.py`, FixMatch with an EMA teacher); every value is a flag:

- pseudo labels are kept where the weak prediction's confidence is >= 0.95 (`--pseudo_label_threshold`;
  UniMatch's Cityscapes config uses 0), and the loss is summed over them and divided by every pixel
  (`--pseudo_label_normalize valid`);
- the CutMix box of a strong view is filled from a second unlabeled image's strong view, and its pseudo
  labels from that image's weak prediction, made in eval mode without gradient. UniMatch draws that image
  from a second pass over the same loader, whose order is the same: it mixes two views of the *same*
  image (its authors call that intended, UniMatch issue #51). That is the default here too (the streams'
  `--cutmix_same_image`, on for these methods; `--cutmix_same_image false` mixes two images);
- the labeled batch and the weak view go through the network in one forward (one BN batch), the strong
  view(s) in another;
- ``L = (L_x + lambda * L_u) / 2`` with lambda = `--cps_weight` (1 by default): UniMatch's ``(loss_x +
  loss_u) / 2``, so lambda 1 is its objective exactly.

``fixmatch``: one strong view, ``L_u = CE(strong, weak pseudo labels)``. With ``--ema_teacher`` it is
UniMatch V2's FixMatch instead: an EMA teacher (eval mode) labels the weak view, the CutMix partner is the
batch flipped (one unlabeled stream), the labeled batch and the strong view share a forward, and the
teacher follows the student with decay ``min(1 - 1/(t+1), 0.996)`` over parameters and buffers.

``unimatch`` (V1): two strong views and a feature-perturbation stream: the head also runs on the weak
view's encoder features with ``Dropout2d(0.5)`` (`--feature_dropout`, the model's `feature_perturbation`),
``L_u = 0.25 CE(s1) + 0.25 CE(s2) + 0.5 CE(fp)``; the fp stream learns from the uncut weak pseudo labels.

``cps_strong`` (none of the references has it): N networks (`--num_networks`, 2 by default) as in CPS,
each network's weak-view argmax supervising every *other* network's prediction on one shared strong view,
averaged over the peers as n-CPS does; ``L = sum_i L_s,i + lambda * sum_i mean_{j != i} CE(p_i(strong),
y_j(weak))``, CPS's form, with CPS's default threshold (0: off). It asks whether cross supervision still
adds anything once strong views exist.

Divergences from the references, by design: the strong views are made on the step's device from the
normalised batch (`cps_hf.strong_views`), and this trainer's unlabeled crops carry no padding mask, so
padded pixels count as valid (UniMatch leaves them out).
"""

from __future__ import annotations

from typing import Sequence

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from ..losses import pseudo_labels
from ..strong_views import StrongViewSettings, cutmix_boxes, strong_view
from .base import KeptFractions, Method, MethodOutput, StepLogs, logits_of, register_method


def _mixed(box: torch.Tensor, inside: torch.Tensor, outside: torch.Tensor) -> torch.Tensor:
    """`inside` where the (B, H, W) box is set, `outside` elsewhere; broadcasts over channels."""
    return torch.where(box[:, None] if inside.ndim == 4 else box, inside, outside)


class _WeakToStrong(Method):
    """What the weak-to-strong methods share: strong views, the 0.95 default threshold, same-image CutMix."""

    num_unlabeled_streams = 2  # the images, and the CutMix partners
    default_cps_weight = 1.0
    default_same_image = True  # UniMatch's second pass over the same loader
    default_threshold = 0.95

    def __init__(self, sup_criterion, pseudo_label_threshold: float | None = None,
                 strong_views: StrongViewSettings | None = None, image_mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
                 image_std: Sequence[float] = IMAGENET_DEFAULT_STD, cps_on_labeled: bool | None = None,
                 cps_on_unlabeled: bool | None = None, **kwargs):
        if cps_on_labeled:
            raise ValueError(f"method {self.name!r} supervises the strong views of unlabeled images only; "
                             "cps_on_labeled=True is not supported for it")
        if cps_on_unlabeled is False:
            raise ValueError(f"method {self.name!r} has no unsupervised term without unlabeled images "
                             "(use --method supervised)")
        threshold = self.default_threshold if pseudo_label_threshold is None else pseudo_label_threshold
        super().__init__(sup_criterion, pseudo_label_threshold=threshold, **kwargs)
        self.strong_views = strong_views or StrongViewSettings()
        self.image_mean, self.image_std = tuple(image_mean), tuple(image_std)

    def strong(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return strong_view(images, self.image_mean, self.image_std, generator, self.strong_views)

    def boxes(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        batch, _, height, width = images.shape
        return cutmix_boxes(batch, height, width, generator, self.strong_views, device=images.device)

    @staticmethod
    def eval_logits(model, images: torch.Tensor) -> torch.Tensor:
        """No-grad logits in eval mode (UniMatch's prediction of the CutMix partners); train mode after."""
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                return logits_of(model, images)
        finally:
            model.train(was_training)

    def _streams(self, batch):
        u0 = batch["unlabeled"][0]["pixel_values"]
        partners = batch["unlabeled"][1]["pixel_values"] if self.num_unlabeled_streams > 1 else None
        if partners is not None and partners.shape != u0.shape:
            raise ValueError(f"method {self.name!r}: the two unlabeled streams must have the same shape, got "
                             f"{tuple(u0.shape)} and {tuple(partners.shape)}")
        return u0, partners

    def _finish(self, loss_sup, loss_u, weight, logs: StepLogs) -> MethodOutput:
        """UniMatch's (L_x + lambda L_u) / 2."""
        loss = (loss_sup + weight * loss_u) / 2 if loss_u is not None else loss_sup / 2
        logs.add("loss", loss)
        return MethodOutput(loss, logs.to_floats())


@register_method
class FixMatchMethod(_WeakToStrong):
    """FixMatch as UniMatch's `fixmatch.py` runs it; `ema_teacher=True`: UniMatch V2's FixMatch with an EMA
    teacher. See the module docstring."""

    name = "fixmatch"
    num_models = 1
    network_names = ("network_1",)

    def __init__(self, sup_criterion, ema_teacher: bool = False, ema_decay: float = 0.996, **kwargs):
        super().__init__(sup_criterion, **kwargs)
        self.ema_teacher = bool(ema_teacher)
        if not 0 <= ema_decay <= 1:
            raise ValueError(f"ema_decay must be in [0, 1], got {ema_decay}")
        self.ema_decay = float(ema_decay)
        if self.ema_teacher:  # V2: student + follower, one unlabeled stream (the partner is the batch flipped)
            self.num_models, self.num_trained, self.num_unlabeled_streams = 2, 1, 1
            self.network_names = ("student", "teacher")
            self.default_export = "student"

    def init_networks(self, networks) -> None:
        super().init_networks(networks)
        if self.ema_teacher:
            with torch.no_grad():
                for teacher, student in zip(networks[1].state_dict().values(), networks[0].state_dict().values()):
                    teacher.copy_(student)

    def ema_decay_at(self, step: int) -> float:
        return min(1.0 - 1.0 / (step + 1), self.ema_decay)

    def after_optimizer_step(self, networks, step: int) -> None:
        """V2: teacher = r * teacher + (1 - r) * student, r = min(1 - 1/(t+1), 0.996), parameters and buffers."""
        if not self.ema_teacher:
            return
        ratio = self.ema_decay_at(step)
        with torch.no_grad():
            for teacher, student in zip(networks[1].state_dict().values(), networks[0].state_dict().values()):
                if teacher.is_floating_point():
                    teacher.mul_(ratio).add_(student.to(teacher.dtype), alpha=1.0 - ratio)
                else:
                    teacher.copy_(student)

    def compute(self, models, batch, step, generator):
        logs = StepLogs()
        labeled = batch["labeled"]
        u0, partners = self._streams(batch)
        weight = self.cps_weight_at(step)
        logs.add("cps_weight", weight)
        num_labeled = labeled["pixel_values"].shape[0]
        model = models[0]
        if weight <= 0:  # warm-up: the labeled images alone
            loss_sup = self._supervised_losses([logits_of(model, labeled["pixel_values"])], labeled["labels"], logs)
            return self._finish(loss_sup, None, weight, logs)
        box = self.boxes(u0, generator)
        if self.ema_teacher:
            logs.add("ema_decay", self.ema_decay_at(step))
            weak = self.eval_logits(models[1], u0)
            strong = self.strong(u0, generator)
            strong = _mixed(box, strong.flip(0), strong)
            logits_x, logits_s = logits_of(model, torch.cat([labeled["pixel_values"], strong])).split(
                [num_labeled, u0.shape[0]])
            mixed_weak = _mixed(box, weak.flip(0), weak)
        else:
            weak_partners = self.eval_logits(model, partners)
            strong = _mixed(box, self.strong(partners, generator), self.strong(u0, generator))
            logits_x, weak = logits_of(model, torch.cat([labeled["pixel_values"], u0])).split(
                [num_labeled, u0.shape[0]])
            logits_s = logits_of(model, strong)
            mixed_weak = _mixed(box, weak_partners, weak.detach())
        loss_sup = self._supervised_losses([logits_x], labeled["labels"], logs)
        targets = self.pseudo_targets(mixed_weak.detach(), logs=logs, log_name="pseudo_kept_u")
        loss_u = self.pseudo_cross_entropy(logits_s, targets)
        logs.add("loss_u_s", loss_u)
        logs.add("cutmix_fraction", box.float().mean())
        return self._finish(loss_sup, loss_u, weight, logs)


@register_method
class UniMatchMethod(_WeakToStrong):
    """UniMatch (V1) as its `unimatch.py` runs it: two strong views and a feature-perturbation stream.
    See the module docstring."""

    name = "unimatch"
    num_models = 1

    def __init__(self, sup_criterion, feature_dropout: float | None = None, **kwargs):
        super().__init__(sup_criterion, **kwargs)
        self.feature_dropout = 0.5 if feature_dropout is None else float(feature_dropout)
        if not 0 < self.feature_dropout < 1:
            raise ValueError(f"feature_dropout must be in (0, 1), got {self.feature_dropout}")

    def compute(self, models, batch, step, generator):
        logs = StepLogs()
        labeled = batch["labeled"]
        u0, partners = self._streams(batch)
        weight = self.cps_weight_at(step)
        logs.add("cps_weight", weight)
        model = models[0]
        if weight <= 0:
            loss_sup = self._supervised_losses([logits_of(model, labeled["pixel_values"])], labeled["labels"], logs)
            return self._finish(loss_sup, None, weight, logs)
        num_labeled, num_unlabeled = labeled["pixel_values"].shape[0], u0.shape[0]
        weak_partners = self.eval_logits(model, partners)
        boxes = [self.boxes(u0, generator), self.boxes(u0, generator)]
        strong_views = [_mixed(box, self.strong(partners, generator), self.strong(u0, generator)) for box in boxes]
        seed = int(torch.randint(0, 2**62, (), generator=generator))  # the dropout masks follow the call's generator
        both = model(pixel_values=torch.cat([labeled["pixel_values"], u0]), feature_perturbation=self.feature_dropout,
                     perturbation_seed=seed)
        clean, perturbed = both.logits.chunk(2)
        logits_x, weak = clean.split([num_labeled, num_unlabeled])
        logits_fp = perturbed[num_labeled:]
        logits_s1, logits_s2 = logits_of(model, torch.cat(strong_views)).chunk(2)
        weak = weak.detach()
        loss_sup = self._supervised_losses([logits_x], labeled["labels"], logs)
        kept = KeptFractions(logs)
        targets_s = [self.pseudo_targets(_mixed(box, weak_partners, weak), logs=kept, log_name=f"pseudo_kept_u_{k}")
                     for k, box in enumerate(boxes, start=1)]
        kept.log_mean("pseudo_kept_u")
        targets_fp = self.pseudo_targets(weak)
        loss_s1 = self.pseudo_cross_entropy(logits_s1, targets_s[0])
        loss_s2 = self.pseudo_cross_entropy(logits_s2, targets_s[1])
        loss_fp = self.pseudo_cross_entropy(logits_fp, targets_fp)
        loss_u = 0.25 * loss_s1 + 0.25 * loss_s2 + 0.5 * loss_fp
        for name, value in (("loss_u_s1", loss_s1), ("loss_u_s2", loss_s2), ("loss_u_fp", loss_fp), ("loss_u", loss_u)):
            logs.add(name, value)
        return self._finish(loss_sup, loss_u, weight, logs)


@register_method
class CPSStrongMethod(_WeakToStrong):
    """CPS across strong views: each network's weak-view pseudo labels supervise the other networks' strong
    view. See the module docstring."""

    name = "cps_strong"
    num_models = 2
    default_threshold = 0.0  # CPS's: no threshold
    default_same_image = False  # CPS's: two different images in a CutMix

    def __init__(self, sup_criterion, num_networks: int = 2, **kwargs):
        super().__init__(sup_criterion, **kwargs)
        if int(num_networks) != num_networks or num_networks < 2:
            raise ValueError(f"method 'cps_strong': num_networks must be an integer >= 2, got {num_networks}")
        self.num_models = int(num_networks)

    def _finish(self, loss_sup, loss_u, weight, logs):
        """CPS's form: L_s (summed over networks) + lambda * L_cps, no halving."""
        loss = loss_sup + weight * loss_u if loss_u is not None else loss_sup
        logs.add("loss", loss)
        return MethodOutput(loss, logs.to_floats())

    def compute(self, models, batch, step, generator):
        logs = StepLogs()
        labeled = batch["labeled"]
        u0, partners = self._streams(batch)
        weight = self.cps_weight_at(step)
        logs.add("cps_weight", weight)
        if weight <= 0:
            logits_l = [logits_of(model, labeled["pixel_values"]) for model in models]
            return self._finish(self._supervised_losses(logits_l, labeled["labels"], logs), None, weight, logs)
        num_labeled = labeled["pixel_values"].shape[0]
        box = self.boxes(u0, generator)
        strong = _mixed(box, self.strong(partners, generator), self.strong(u0, generator))
        logits_x, targets, logits_s = [], [], []
        kept = KeptFractions(logs)
        for k, model in enumerate(models, start=1):
            weak_partners = self.eval_logits(model, partners)
            clean_x, weak = logits_of(model, torch.cat([labeled["pixel_values"], u0])).split(
                [num_labeled, u0.shape[0]])
            logits_x.append(clean_x)
            targets.append(self.pseudo_targets(_mixed(box, weak_partners, weak.detach()), logs=kept,
                                               log_name=f"pseudo_kept_u_{k}"))
            logits_s.append(logits_of(model, strong))
        kept.log_mean("pseudo_kept_u")
        loss_sup = self._supervised_losses(logits_x, labeled["labels"], logs)
        loss_u = None
        for i, student in enumerate(logits_s):
            peers = [self.pseudo_cross_entropy(student, target) for j, target in enumerate(targets) if j != i]
            term = sum(peers[1:], peers[0]) / len(peers)
            loss_u = term if loss_u is None else loss_u + term
        logs.add("loss_cps", loss_u)
        self._log_agreement("agreement_u", pseudo_labels(logits_s[0]), pseudo_labels(logits_s[1]), logs)  # networks 1, 2
        return self._finish(loss_sup, loss_u, weight, logs)
