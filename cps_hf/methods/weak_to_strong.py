"""What the weak-to-strong methods share: strong views, UniMatch's loss form and the EMA teacher.

Each network's prediction on the weak view (the usual crop, scale and flip) gives pseudo labels for its
prediction on a strong view of the same geometry (colour jitter, grayscale, blur and a CutMix box:
`cps_hf.strong_views`). Read from `LiheYoung/UniMatch` (`fixmatch.py`, `unimatch.py`, `dataset/semi.py`)
and `LiheYoung/UniMatch-V2` (`fixmatch.py`, `unimatch_v2.py`); every value is a flag. The methods:
``fixmatch`` (fixmatch.py; ``--ema_teacher``: V2's FixMatch), ``unimatch`` and ``unimatch_v2``
(unimatch.py) and ``cps_strong`` (cps_strong.py). What they share, as UniMatch's code does it:

- pseudo labels are kept where the weak prediction's confidence is >= 0.95 (`--pseudo_label_threshold`;
  UniMatch's Cityscapes config uses 0), and the loss is summed over them and divided by every pixel
  (`--pseudo_label_normalize valid`);
- the CutMix box of a strong view is filled from a second unlabeled image's strong view, and its pseudo
  labels from that image's weak prediction, made in eval mode without gradient. UniMatch draws that image
  from a second pass over the same loader, whose order is the same: it mixes two views of the *same*
  image (its authors call that intended, UniMatch issue #51). That is the default here too (the streams'
  `--cutmix_same_image`, on for these methods; `--cutmix_same_image false` mixes two images). With an EMA
  teacher (V2) the partner is the batch flipped, from one unlabeled stream;
- ``L = (L_x + lambda * L_u) / 2`` with lambda = `--cps_weight` (1 by default): UniMatch's ``(loss_x +
  loss_u) / 2``, so lambda 1 is its objective exactly;
- V2's EMA teacher (`EMATeacher`): a copy of the student at the start, in eval mode for its forwards,
  following it with decay ``min(1 - 1/(t+1), 0.996)`` over parameters and buffers after every step.

Divergences from the references, by design: the strong views are made on the step's device from the
normalised batch (`cps_hf.strong_views`), and this trainer's unlabeled crops carry no padding mask, so
padded pixels count as valid (UniMatch leaves them out).
"""

from __future__ import annotations

from typing import Sequence

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from ..strong_views import StrongViewSettings, cutmix_boxes, strong_view
from .base import Method, MethodOutput, StepLogs, logits_of


def mixed(box: torch.Tensor, inside: torch.Tensor, outside: torch.Tensor) -> torch.Tensor:
    """`inside` where the (B, H, W) box is set, `outside` elsewhere; broadcasts over channels."""
    return torch.where(box[:, None] if inside.ndim == 4 else box, inside, outside)


class WeakToStrongMethod(Method):
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

    def _start(self, batch, step: int):
        """What every step begins with: its logs (lambda logged), the labeled batch, the unlabeled images,
        their CutMix partners (None with one stream) and lambda."""
        logs = StepLogs()
        weight = self.cps_weight_at(step)
        logs.add("cps_weight", weight)
        u0, partners = self._streams(batch)
        return logs, batch["labeled"], u0, partners, weight

    def _finish(self, loss_sup, loss_u, weight, logs: StepLogs) -> MethodOutput:
        """UniMatch's (L_x + lambda L_u) / 2."""
        loss = (loss_sup + weight * loss_u) / 2 if loss_u is not None else loss_sup / 2
        logs.add("loss", loss)
        return MethodOutput(loss, logs.to_floats())


class EMATeacher:
    """UniMatch V2's teacher: network 2 starts as a copy of the student (network 1) and follows it with decay
    ``min(1 - 1/(t+1), ema_decay)`` over parameters and buffers (integer buffers are copied)."""

    ema_decay = 0.996

    def copy_student_into_teacher(self, networks) -> None:
        with torch.no_grad():
            for teacher, student in zip(networks[1].state_dict().values(), networks[0].state_dict().values()):
                teacher.copy_(student)

    def ema_decay_at(self, step: int) -> float:
        return min(1.0 - 1.0 / (step + 1), self.ema_decay)

    def update_teacher(self, networks, step: int) -> None:
        ratio = self.ema_decay_at(step)
        with torch.no_grad():
            for teacher, student in zip(networks[1].state_dict().values(), networks[0].state_dict().values()):
                if teacher.is_floating_point():
                    teacher.mul_(ratio).add_(student.to(teacher.dtype), alpha=1.0 - ratio)
                else:
                    teacher.copy_(student)


def check_ema_decay(ema_decay: float) -> float:
    if not 0 <= ema_decay <= 1:
        raise ValueError(f"ema_decay must be in [0, 1], got {ema_decay}")
    return float(ema_decay)
