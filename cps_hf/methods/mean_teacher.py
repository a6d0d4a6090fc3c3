"""Mean teacher (paper Section 4, eq. 8 and Figure 1c), plain and with CutMix (CutMix-Seg, French et al.).

Networks: ``[student, teacher]``. Only the student is optimised; the teacher is a "follower":
an exponential moving average of the student, never in the optimizer or DDP, saved with the
checkpoints as custom state.

The paper's MT and CutMix-Seg numbers come from two public codebases, and each method here
defaults to what its codebase (and its experiment scripts) does; every setting is a flag, so the
other form is one flag away.

``mean_teacher``: PixelSSL (``ZHKKKe/PixelSSL``, ``ssl_mt.py`` with its DeepLab VOC MT script):

- consistency ``logit_mse``: ``nn.MSELoss`` between the student's and the teacher's *logits*, a mean
  over batch, classes and pixels (``--mt_consistency``);
- lambda ramped up with ``exp(-5 (1 - t)^2)`` over the first 3 epochs, per iteration
  (``--cps_weight_rampup_epochs``; its scripts use ``cons_scale`` 1 and 3 epochs);
- EMA decay ``min(1 - 1/(t + 1), 0.99)``: the teacher follows the student closely at first
  (``--mt_ema_warmup``); parameters only, the teacher's BN statistics are its own (``--mt_ema_buffers``);
- no input noise: its Gaussian noise is off by default (``--mt_noise_std``; this package used 0.1
  before);
- consistency on unlabeled images only (its scripts set ``cons_for_labeled`` off); the student is
  exported (PixelSSL reports both; ``--export_network teacher`` for the other).

``mean_teacher_cutmix``: CutMix-Seg (``Britefury/cutmix-semisup-seg``, ``train_seg_semisup_mask_mt.py``
with the flags of its CutMix experiment scripts):

- the teacher's logits on u0 and u1, mixed with the box mask, give the target of the student's
  prediction on the mixed image; consistency ``probability``: squared difference of the softmaxes,
  summed over classes, mean over pixels (its ``cons_loss_fn='var'``);
- confidence ``--conf_thresh=0.97`` with ``conf_per_pixel`` off: the loss is multiplied by the
  *fraction* of pixels (whole batch) whose mixed-teacher confidence reaches 0.97, a scalar that
  also acts as a ramp-up early on (``--pseudo_label_threshold``, ``--mt_confidence_weighting``);
- one box covering 50% of the image (``--mask_prop_range=0.5``, one box; ``--cutmix_num_boxes``,
  ``--cutmix_area_range``);
- ``--freeze_bn``: the encoder's BatchNorms stay in eval mode (their statistics frozen, their
  affine parameters trained, as its DeepLabv3+ does), for student and teacher (``--freeze_bn``);
- fixed EMA decay 0.99 over every floating-point state entry, BN statistics included (its
  ``EMAWeightOptimizer``); no ramp-up;
- the **teacher** is evaluated and exported (its ``eval_net = teacher_net``).

Both run the teacher under ``torch.no_grad()`` in the loop's (train) mode, like both references, so
its BN normalises with the batch's statistics. Integer buffers (``num_batches_tracked``) are copied
from the student when buffers are averaged. ``init_networks`` copies the whole state dict, so the
teacher starts as the student.

Consistency forms (per pixel i of the unlabeled batch, then combined over pixels):

- ``logit_mse``: ``mean_c (s_ic - t_ic)^2``;
- ``probability``: ``sum_c (softmax(s)_ic - softmax(t)_ic)^2``;
- ``pseudo_label``: ``CE(s_i, argmax t_i)``, CPS's supervision form with an EMA teacher.

With ``pseudo_label_threshold`` 0 the loss is their mean over all pixels. With a threshold, pixel i
is confident when the teacher's top softmax probability reaches it, and
``--mt_confidence_weighting`` ``fraction`` multiplies that mean by the fraction of confident
pixels (CutMix-Seg), ``pixel`` keeps the confident pixels only and divides by all pixels
(``--pseudo_label_normalize valid``, French's ``conf_per_pixel``) or by the confident ones (``kept``).

L = L_s(student) + lambda * L_mt with lambda = ``cps_weight_at(step)``. Logs: ``loss``, ``loss_sup``,
``loss_mt``, ``cps_weight``, ``ema_decay``, ``agreement_u`` (+ ``_fg``: student vs teacher argmax on
the unlabeled images the loss compares) and, with a threshold, ``pseudo_kept_u``. While lambda is 0
(warm-up) the teacher and unlabeled forwards are skipped, as in the CPS methods.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from ..cutmix import mix
from ..losses import pseudo_labels
from .base import Method, MethodOutput, StepLogs, logits_of, register_method

CONSISTENCIES = ("logit_mse", "probability", "pseudo_label")
CONFIDENCE_WEIGHTINGS = ("fraction", "pixel")


@register_method
class MeanTeacherMethod(Method):
    """Mean teacher (eq. 8, Figure 1c) as PixelSSL runs it: an EMA teacher's logits on the unlabeled
    batch supervise the student's. See the module docstring for the settings and their sources.

    Args (besides `Method`'s; None takes the method's default, the reference's):
        ema_decay: the teacher's EMA decay (its cap when `ema_warmup`), in [0, 1].
        consistency: "logit_mse", "probability" or "pseudo_label".
        student_noise_std: std of the Gaussian noise added to the student's view (0: none).
        ema_warmup: decay min(1 - 1/(t + 1), ema_decay) at update t (0-based) instead of ema_decay.
        ema_buffers: also average the BN running statistics (else the teacher keeps its own).
        confidence_weighting: "fraction" or "pixel" (only with a threshold).
        cps_on_labeled / cps_on_unlabeled: accepted so the trainer's flags are not silently
            ignored; the consistency is on unlabeled images only.
    """

    name = "mean_teacher"
    num_models = 2
    num_trained = 1
    num_unlabeled_streams = 1
    network_names = ("student", "teacher")
    default_export = "student"
    default_rampup_epochs = 3.0  # PixelSSL's sseg MT scripts: cons_rampup_epochs 3
    default_cps_weight = 1.0  # PixelSSL's cons_scale and CutMix-Seg's cons_weight
    defaults = dict(consistency="logit_mse", student_noise_std=0.0, ema_warmup=True, ema_buffers=False,
                    confidence_weighting="pixel", pseudo_label_threshold=0.0)

    def __init__(
        self,
        sup_criterion,
        ema_decay: float = 0.99,
        consistency: str | None = None,
        student_noise_std: float | None = None,
        ema_warmup: bool | None = None,
        ema_buffers: bool | None = None,
        confidence_weighting: str | None = None,
        pseudo_label_threshold: float | None = None,
        cps_on_labeled: bool | None = None,
        cps_on_unlabeled: bool | None = None,
        **kwargs,
    ):
        if cps_on_labeled:
            raise ValueError(f"method {self.name!r} applies the consistency to unlabeled images only; "
                             "cps_on_labeled=True is not supported for it")
        if cps_on_unlabeled is False:
            raise ValueError(f"method {self.name!r} has no consistency term without unlabeled images; "
                             "cps_on_unlabeled=False is not supported for it (use --method supervised)")
        given = dict(consistency=consistency, student_noise_std=student_noise_std, ema_warmup=ema_warmup,
                     ema_buffers=ema_buffers, confidence_weighting=confidence_weighting,
                     pseudo_label_threshold=pseudo_label_threshold)
        settings = {key: self.defaults[key] if value is None else value for key, value in given.items()}
        super().__init__(sup_criterion, pseudo_label_threshold=settings["pseudo_label_threshold"], **kwargs)
        if not 0.0 <= ema_decay <= 1.0:
            raise ValueError(f"ema_decay must be in [0, 1], got {ema_decay}")
        if settings["consistency"] not in CONSISTENCIES:
            raise ValueError(f"consistency must be one of {', '.join(CONSISTENCIES)}, got {settings['consistency']!r}")
        if settings["confidence_weighting"] not in CONFIDENCE_WEIGHTINGS:
            raise ValueError(f"confidence_weighting must be one of {', '.join(CONFIDENCE_WEIGHTINGS)}, "
                             f"got {settings['confidence_weighting']!r}")
        if settings["student_noise_std"] < 0:
            raise ValueError(f"student_noise_std must be >= 0, got {settings['student_noise_std']}")
        self.ema_decay = float(ema_decay)
        self.consistency = settings["consistency"]
        self.student_noise_std = float(settings["student_noise_std"])
        self.ema_warmup = bool(settings["ema_warmup"])
        self.ema_buffers = bool(settings["ema_buffers"])
        self.confidence_weighting = settings["confidence_weighting"]

    # -- the teacher ---------------------------------------------------------------------------

    @staticmethod
    def _paired(student: torch.nn.Module, teacher: torch.nn.Module, state: bool):
        """(teacher tensor, student tensor) pairs: the whole state dict, or the parameters only."""
        if not state:
            return list(zip(teacher.parameters(), student.parameters()))
        student_state, teacher_state = student.state_dict(), teacher.state_dict()
        if student_state.keys() != teacher_state.keys():
            raise ValueError("mean teacher: student and teacher have different state dict keys "
                             "(different architectures?)")
        return [(teacher_state[key], student_state[key]) for key in teacher_state]

    def init_networks(self, networks: Sequence[torch.nn.Module]) -> None:
        """The teacher starts as an exact copy of the student (parameters and buffers)."""
        super().init_networks(networks)  # --freeze_bn
        with torch.no_grad():
            for teacher_tensor, student_tensor in self._paired(networks[0], networks[1], state=True):
                teacher_tensor.copy_(student_tensor)

    def ema_decay_at(self, step: int) -> float:
        """The decay of the update after optimizer step `step` (0-based)."""
        if self.ema_warmup:
            return min(1.0 - 1.0 / (step + 1), self.ema_decay)
        return self.ema_decay

    def after_optimizer_step(self, networks: Sequence[torch.nn.Module], step: int) -> None:
        """teacher = decay * teacher + (1 - decay) * student for every parameter, and with `ema_buffers`
        every floating-point buffer too (integer buffers are then copied)."""
        decay = self.ema_decay_at(step)
        with torch.no_grad():
            for teacher_tensor, student_tensor in self._paired(networks[0], networks[1], state=self.ema_buffers):
                if teacher_tensor.is_floating_point():
                    teacher_tensor.mul_(decay).add_(student_tensor.to(teacher_tensor.dtype), alpha=1.0 - decay)
                else:
                    teacher_tensor.copy_(student_tensor)

    # -- the step ------------------------------------------------------------------------------

    def student_view(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """X_1 = X_2 + sigma * N(0, 1), the noise drawn on the images' device from a seed taken from
        `generator` (one draw), so it depends on the call's (seed, step, rank, micro_step) only."""
        if self.student_noise_std <= 0:
            return images
        seed = int(torch.randint(0, 2**62, (1,), generator=generator))
        device_generator = torch.Generator(device=images.device).manual_seed(seed)
        noise = torch.randn(images.shape, generator=device_generator, device=images.device, dtype=images.dtype)
        return images + self.student_noise_std * noise

    def per_pixel_consistency(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                              teacher_predictions: torch.Tensor) -> torch.Tensor:
        """(B, H, W) consistency between the student's logits and the (detached) teacher's."""
        if self.consistency == "pseudo_label":
            return F.cross_entropy(student_logits.float(), teacher_predictions, reduction="none")
        student, teacher = student_logits.float(), teacher_logits.float()
        if self.consistency == "logit_mse":
            return (student - teacher).square().mean(dim=1)
        return (student.softmax(dim=1) - teacher.softmax(dim=1)).square().sum(dim=1)

    def consistency_loss(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                         logs: StepLogs | None = None, teacher_predictions: torch.Tensor | None = None) -> torch.Tensor:
        """L_mt between the student's logits and the (detached) teacher's, per `self.consistency` and,
        with a threshold, `self.confidence_weighting` (see the module docstring)."""
        teacher_logits = teacher_logits.detach()
        if teacher_predictions is None:
            teacher_predictions = pseudo_labels(teacher_logits)
        targets = self.pseudo_targets(teacher_logits, teacher_predictions, logs, "pseudo_kept_u")
        per_pixel = self.per_pixel_consistency(student_logits, teacher_logits, teacher_predictions)
        if self.pseudo_label_threshold <= 0:
            return per_pixel.mean()
        confident = (targets != self.ignore_index).to(per_pixel.dtype)
        if self.confidence_weighting == "fraction":
            return per_pixel.mean() * confident.mean()
        denominator = self.pseudo_denominator(targets)
        return (per_pixel * confident).sum() / (denominator or confident.sum().clamp(min=1))

    def _finish(self, loss_sup, student_logits, teacher_logits, weight, logs: StepLogs) -> MethodOutput:
        loss = loss_sup
        if student_logits is not None:
            teacher_predictions = pseudo_labels(teacher_logits)
            loss_mt = self.consistency_loss(student_logits, teacher_logits, logs, teacher_predictions)
            logs.add("loss_mt", loss_mt)
            self._log_agreement("agreement_u", pseudo_labels(student_logits), teacher_predictions, logs)
            loss = loss + weight * loss_mt
        logs.add("loss", loss)
        return MethodOutput(loss, logs.to_floats())

    def compute(self, models, batch, step, generator):
        logs = StepLogs()
        student, teacher = models
        labeled, unlabeled = batch["labeled"], batch["unlabeled"][0]["pixel_values"]
        weight = self.cps_weight_at(step)
        logs.add("cps_weight", weight)
        logs.add("ema_decay", self.ema_decay_at(step))

        loss_sup = self._supervised_losses([logits_of(student, labeled["pixel_values"])], labeled["labels"], logs)
        student_logits = teacher_logits = None
        if weight > 0:
            with torch.no_grad():
                teacher_logits = logits_of(teacher, unlabeled)
            student_logits = logits_of(student, self.student_view(unlabeled, generator))
        return self._finish(loss_sup, student_logits, teacher_logits, weight, logs)


@register_method
class MeanTeacherCutMixMethod(MeanTeacherMethod):
    """CutMix-Seg (French et al.) as its CutMix experiment scripts run it: the EMA teacher's logits on u0
    and u1, mixed with the box mask M, supervise the student's prediction on u0 * (1 - M) + u1 * M,
    weighted by the fraction of confident teacher pixels; the teacher is exported.

    One mask per sample, drawn from `generator` as in ``cps_cutmix`` (one 50% box by default); u0 and
    u1 come from two unlabeled streams. ``agreement_u`` compares the student with the mixed teacher
    argmax on the mixed images. No noise view: CutMix is the perturbation (CutMix-Seg's unpaired mode).
    """

    name = "mean_teacher_cutmix"
    num_unlabeled_streams = 2
    default_export = "teacher"  # CutMix-Seg evaluates eval_net = teacher_net
    default_rampup_epochs = 0.0  # its rampup flag is -1 (off)
    default_freeze_bn = True  # every CutMix-Seg script passes --freeze_bn
    default_cutmix_boxes = (1, (0.5, 0.5))  # --mask_prop_range=0.5, boxmask_n_boxes 1
    defaults = dict(consistency="probability", student_noise_std=0.0, ema_warmup=False, ema_buffers=True,
                    confidence_weighting="fraction", pseudo_label_threshold=0.97)

    def compute(self, models, batch, step, generator):
        logs = StepLogs()
        student, teacher = models
        labeled = batch["labeled"]
        u0 = batch["unlabeled"][0]["pixel_values"]
        u1 = batch["unlabeled"][1]["pixel_values"]
        if u0.shape != u1.shape:
            raise ValueError(
                f"method {self.name!r}: the two unlabeled streams must have the same shape, got "
                f"{tuple(u0.shape)} and {tuple(u1.shape)}"
            )
        weight = self.cps_weight_at(step)
        logs.add("cps_weight", weight)
        logs.add("ema_decay", self.ema_decay_at(step))

        loss_sup = self._supervised_losses([logits_of(student, labeled["pixel_values"])], labeled["labels"], logs)
        student_logits = teacher_logits = None
        if weight > 0:
            mask = self.cutmix_mask(u0, generator)
            with torch.no_grad():
                teacher_logits = mix(logits_of(teacher, u0), logits_of(teacher, u1), mask)
            mixed_images = mix(u0, u1, mask.to(u0.dtype))
            student_logits = logits_of(student, self.student_view(mixed_images, generator))
        return self._finish(loss_sup, student_logits, teacher_logits, weight, logs)
