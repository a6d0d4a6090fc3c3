"""FixMatch as UniMatch's `fixmatch.py` runs it, and UniMatch V2's FixMatch with an EMA teacher.

``fixmatch``: the student's weak view (pseudo labels, no gradient) supervises one strong view,
``L_u = CE(strong, weak pseudo labels)``; the labeled batch and the weak view share a forward (one BN batch),
the strong view has its own, the CutMix partners' pseudo labels come from an eval-mode forward.
``--ema_teacher``: UniMatch V2's `fixmatch.py`: the EMA teacher (eval mode) labels the weak view, the CutMix
partner is the batch flipped (one unlabeled stream), and the labeled batch and the strong view share a
forward. What every weak-to-strong method shares is in weak_to_strong.py.
"""

from __future__ import annotations

import torch

from .base import logits_of, register_method
from .weak_to_strong import EMATeacher, WeakToStrongMethod, check_ema_decay, mixed


@register_method
class FixMatchMethod(EMATeacher, WeakToStrongMethod):
    """FixMatch as UniMatch's `fixmatch.py` runs it; `ema_teacher=True`: UniMatch V2's FixMatch with an EMA
    teacher. See the module docstring."""

    name = "fixmatch"
    num_models = 1
    network_names = ("network_1",)

    def __init__(self, sup_criterion, ema_teacher: bool = False, ema_decay: float = 0.996, **kwargs):
        super().__init__(sup_criterion, **kwargs)
        self.ema_teacher = bool(ema_teacher)
        self.ema_decay = check_ema_decay(ema_decay)
        if self.ema_teacher:  # V2: student + follower, one unlabeled stream (the partner is the batch flipped)
            self.num_models, self.num_trained, self.num_unlabeled_streams = 2, 1, 1
            self.network_names = ("student", "teacher")
            self.default_export = "student"

    def init_networks(self, networks) -> None:
        super().init_networks(networks)
        if self.ema_teacher:
            self.copy_student_into_teacher(networks)

    def after_optimizer_step(self, networks, step: int) -> None:
        if self.ema_teacher:
            self.update_teacher(networks, step)

    def compute(self, models, batch, step, generator):
        logs, labeled, u0, partners, weight = self._start(batch, step)
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
            strong = mixed(box, strong.flip(0), strong)
            logits_x, logits_s = logits_of(model, torch.cat([labeled["pixel_values"], strong])).split(
                [num_labeled, u0.shape[0]])
            mixed_weak = mixed(box, weak.flip(0), weak)
        else:
            weak_partners = self.eval_logits(model, partners)
            strong = mixed(box, self.strong(partners, generator), self.strong(u0, generator))
            logits_x, weak = logits_of(model, torch.cat([labeled["pixel_values"], u0])).split(
                [num_labeled, u0.shape[0]])
            logits_s = logits_of(model, strong)
            mixed_weak = mixed(box, weak_partners, weak.detach())
        loss_sup = self._supervised_losses([logits_x], labeled["labels"], logs)
        targets = self.pseudo_targets(mixed_weak.detach(), logs=logs, log_name="pseudo_kept_u")
        loss_u = self.pseudo_cross_entropy(logits_s, targets)
        logs.add("loss_u_s", loss_u)
        logs.add("cutmix_fraction", box.float().mean())
        return self._finish(loss_sup, loss_u, weight, logs)
