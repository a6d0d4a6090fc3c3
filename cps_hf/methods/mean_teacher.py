"""Mean teacher (paper Section 4, eq. 8 and Figure 1c), plain and with CutMix (CutMix-Seg, French et al.).

Networks: ``[student, teacher]``. Only the student is optimised; the teacher is a "follower":
an exponential moving average of the student, never in the optimizer or DDP, saved with the
checkpoints as custom state.

Design choices (and where they come from):

- **Consistency form.** Eq. 8 has no one-hot map Y (compare eq. 3, 9 and 10, which write the
  argmax step ``P -> Y`` explicitly), and the text says the consistency "aims to align the
  probability map P_1 of X_1 predicted by the student network to the probability map P_2 of X_2
  predicted by the teacher network". Both implementations the paper's tables ran for it use a
  squared-error consistency, not pseudo labels: the MT rows come from GCT's PixelSSL
  (``ssl_mt.py``: ``nn.MSELoss`` between student and teacher outputs) and CutMix-Seg from
  French et al.'s code (default ``cons_loss_fn='var'``: squared difference of the softmax
  probabilities, summed over classes, averaged over pixels). So the default,
  ``consistency="probability"``, is

      L_mt = 1/(B H W) sum_{b,i} m_{bi} * || softmax(s_{bi}) - softmax(t_{bi}) ||_2^2

  with m = 1 everywhere, or, with ``pseudo_label_threshold`` > 0, m = 1 only where the teacher's
  top softmax probability reaches the threshold (French's ``conf_thresh``, per pixel; masked
  pixels count as zeros in the mean, as there). ``consistency="pseudo_label"`` instead trains the
  student with cross-entropy on the teacher's (thresholded) argmax, i.e. CPS's supervision form
  with an EMA teacher; its mean is over the kept pixels, like every CE in this package. Both
  forms take their mask from ``Method.pseudo_targets``, so ``--pseudo_label_threshold`` and the
  ``pseudo_kept_u`` log work for both. (``consistency`` is a constructor argument; the trainer
  does not pass one, so ``--method mean_teacher`` runs the probability form.)
- **EMA of the BN buffers.** After every optimizer update, for every *floating-point* entry of the
  state dict, i.e. parameters *and* BN ``running_mean``/``running_var``:
  ``teacher = decay * teacher + (1 - decay) * student``, with a fixed decay (``ema_decay``,
  0.99 by default as CutMix-Seg's ``teacher_alpha``). This is what French et al.'s
  ``EMAWeightOptimizer`` does (it averages every float tensor of ``state_dict()``), so the
  teacher's running statistics belong to the averaged weights instead of being copied from a
  student whose weights differ. Integer buffers (``num_batches_tracked``) cannot be averaged and
  are copied from the student (French leaves them alone; with BN momentum set they are unused).
  ``init_networks`` copies the whole state dict, so the teacher starts as the student.
- **Teacher mode.** The teacher runs under ``torch.no_grad()`` in the mode the loop set, i.e.
  train mode, like both reference implementations (French: ``teacher_net.train()``; PixelSSL:
  ``self.t_model.train()``) and like CPS's own pseudo-label forwards: its BN normalises with the
  batch's statistics (so its outputs do not depend on rank-local running statistics) and updates
  its running statistics, which the EMA then blends with the student's. Without SyncBN those
  running statistics differ between DDP ranks until the loop broadcasts rank 0's buffers (before
  evaluation, export and the fingerprint), exactly as for the student.
- **Second view (``mean_teacher`` only).** The data streams give one augmented unlabeled batch
  per step. The teacher sees it as is (X_2); the student sees X_1 = X_2 + sigma * N(0, 1), a
  Gaussian-noise input perturbation (PixelSSL's MT perturbation, ``--gaussian-noise-std``) on the
  normalised tensor, sigma = ``student_noise_std`` (0.1 by default; 0 gives both networks the same
  input, PixelSSL's default). The noise is drawn on the images' device from a seed taken from the
  call's ``generator``, so it depends on (seed, step, rank, micro_step) only and a resumed run
  draws the same noise. No geometric change, so pixel i of both views is the same pixel.
- **CutMix (``mean_teacher_cutmix``).** As CutMix-Seg (unpaired mode): the teacher runs on u0 and
  u1 (two unlabeled streams), its logits are mixed with the box mask M, and the student's
  prediction on ``u0 * (1 - M) + u1 * M`` is trained towards them. CutMix is the perturbation;
  no noise is added.

L = L_s(student) + lambda * L_mt with lambda = ``cps_weight_at(step)`` (``--cps_weight`` with its
warm-up/ramp-up). The consistency is on unlabeled images only (PixelSSL's ``cons_for_labeled``
default, CutMix-Seg). Logs: ``loss``, ``loss_sup``, ``loss_mt``, ``cps_weight``, ``agreement_u``
(+ ``_fg``: student vs teacher argmax on the unlabeled images the loss compares) and, with a
threshold, ``pseudo_kept_u``. During the warm-up (lambda = 0) the teacher and unlabeled forwards
are skipped, as in the CPS methods.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..cutmix import box_mask, mix
from ..losses import cross_entropy, pseudo_labels
from .base import Method, MethodOutput, StepLogs, logits_of, register_method

CONSISTENCIES = ("probability", "pseudo_label")


@register_method
class MeanTeacherMethod(Method):
    """Mean teacher (eq. 8, Figure 1c): an EMA teacher's predictions on the unlabeled batch supervise
    the student's predictions on a noised view of it. See the module docstring for the choices.

    Args (besides `Method`'s):
        ema_decay: the teacher's EMA decay, in [0, 1].
        consistency: "probability" (squared error of the softmax maps, default) or "pseudo_label"
            (CE on the teacher's argmax).
        student_noise_std: std of the Gaussian noise added to the student's view (0: none).
        cps_on_labeled / cps_on_unlabeled: accepted so the trainer's flags are not silently
            ignored; the consistency is on unlabeled images only.
    """

    name = "mean_teacher"
    num_models = 2
    num_trained = 1
    num_unlabeled_streams = 1
    network_names = ("student", "teacher")
    default_export = "student"

    def __init__(
        self,
        sup_criterion,
        ema_decay: float = 0.99,
        consistency: str = "probability",
        student_noise_std: float = 0.1,
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
        super().__init__(sup_criterion, **kwargs)
        if not 0.0 <= ema_decay <= 1.0:
            raise ValueError(f"ema_decay must be in [0, 1], got {ema_decay}")
        if consistency not in CONSISTENCIES:
            raise ValueError(f"consistency must be one of {', '.join(CONSISTENCIES)}, got {consistency!r}")
        if student_noise_std < 0:
            raise ValueError(f"student_noise_std must be >= 0, got {student_noise_std}")
        self.ema_decay = float(ema_decay)
        self.consistency = consistency
        self.student_noise_std = float(student_noise_std)

    # -- the teacher ---------------------------------------------------------------------------

    @staticmethod
    def _paired_states(networks: Sequence[torch.nn.Module]):
        student, teacher = networks[0], networks[1]
        student_state, teacher_state = student.state_dict(), teacher.state_dict()
        if student_state.keys() != teacher_state.keys():
            raise ValueError("mean teacher: student and teacher have different state dict keys "
                             "(different architectures?)")
        return [(teacher_state[key], student_state[key]) for key in teacher_state]

    def init_networks(self, networks: Sequence[torch.nn.Module]) -> None:
        """The teacher starts as an exact copy of the student (parameters and buffers)."""
        with torch.no_grad():
            for teacher_tensor, student_tensor in self._paired_states(networks):
                teacher_tensor.copy_(student_tensor)

    def after_optimizer_step(self, networks: Sequence[torch.nn.Module], step: int) -> None:
        """teacher = decay * teacher + (1 - decay) * student for every floating-point parameter and
        buffer (BN running statistics included, as French et al.); integer buffers are copied."""
        decay = self.ema_decay
        with torch.no_grad():
            for teacher_tensor, student_tensor in self._paired_states(networks):
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

    def consistency_loss(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                         logs: StepLogs | None = None, teacher_predictions: torch.Tensor | None = None) -> torch.Tensor:
        """L_mt between the student's logits and the (detached) teacher's, per `self.consistency`."""
        teacher_logits = teacher_logits.detach()
        targets = self.pseudo_targets(teacher_logits, teacher_predictions, logs, "pseudo_kept_u")
        if self.consistency == "pseudo_label":
            return cross_entropy(student_logits, targets, self.ignore_index)
        difference = student_logits.float().softmax(dim=1) - teacher_logits.float().softmax(dim=1)
        per_pixel = difference.square().sum(dim=1)  # (B, H, W)
        if self.pseudo_label_threshold > 0:
            per_pixel = per_pixel * (targets != self.ignore_index).to(per_pixel.dtype)
        return per_pixel.mean()

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

        loss_sup = self._supervised_losses([logits_of(student, labeled["pixel_values"])], labeled["labels"], logs)
        student_logits = teacher_logits = None
        if weight > 0:
            with torch.no_grad():
                teacher_logits = logits_of(teacher, unlabeled)
            student_logits = logits_of(student, self.student_view(unlabeled, generator))
        return self._finish(loss_sup, student_logits, teacher_logits, weight, logs)


@register_method
class MeanTeacherCutMixMethod(MeanTeacherMethod):
    """CutMix-Seg (French et al.): the EMA teacher's logits on u0 and u1, mixed with the box mask M,
    supervise the student's prediction on the mixed image u0 * (1 - M) + u1 * M.

    One mask per sample, drawn from `generator` as in ``cps_cutmix``; u0 and u1 come from two
    unlabeled streams. Same consistency forms, EMA, teacher mode and logs as ``mean_teacher``
    (``agreement_u`` compares the student with the mixed teacher argmax on the mixed images). No
    noise view: CutMix is the perturbation (CutMix-Seg's unpaired mode, its default).
    """

    name = "mean_teacher_cutmix"
    num_unlabeled_streams = 2

    def __init__(self, sup_criterion, student_noise_std: float = 0.0, **kwargs):
        super().__init__(sup_criterion, student_noise_std=student_noise_std, **kwargs)

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

        loss_sup = self._supervised_losses([logits_of(student, labeled["pixel_values"])], labeled["labels"], logs)
        student_logits = teacher_logits = None
        if weight > 0:
            batch_size, _, height, width = u0.shape
            mask = box_mask(batch_size, height, width, generator=generator, device=u0.device)
            with torch.no_grad():
                teacher_logits = mix(logits_of(teacher, u0), logits_of(teacher, u1), mask)
            mixed_images = mix(u0, u1, mask.to(u0.dtype))
            student_logits = logits_of(student, self.student_view(mixed_images, generator))
        return self._finish(loss_sup, student_logits, teacher_logits, weight, logs)
