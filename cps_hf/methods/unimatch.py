"""UniMatch V1 and V2 as their code runs them.

``unimatch`` (V1, `LiheYoung/UniMatch` `unimatch.py`): FixMatch with two strong views and a feature-perturbation
stream: the head also runs on the weak view's encoder features with ``Dropout2d(0.5)`` (`--feature_dropout`,
the model's `feature_perturbation`), ``L_u = 0.25 CE(s1) + 0.25 CE(s2) + 0.5 CE(fp)``; the fp stream learns
from the uncut weak pseudo labels. The labeled batch and the weak view share a forward (one BN batch).

``unimatch_v2`` (`LiheYoung/UniMatch-V2` `unimatch_v2.py`): the EMA teacher (eval mode, no gradient) labels
the weak view; two strong views, each CutMixed with the batch flipped under its own box, go through the
student in one forward with *complementary channel dropout* on the head's inputs (the model's
`complementary_dropout`: a channel zeroed in view 1 is doubled in view 2 and the reverse; half of the pairs
untouched; `--feature_dropout` sets that share, 0.5); the labeled batch has a forward of its own;
``L_u = (CE(s1) + CE(s2)) / 2``, ``L = (L_x + lambda L_u) / 2``. V2 runs it on DINOv2 with the DPT head
(`--decode_head dpt`); it works on any encoder here (on a CNN the masks act on DeepLabv3+'s two inputs).
What every weak-to-strong method shares is in weak_to_strong.py.
"""

from __future__ import annotations

import torch

from .base import KeptFractions, logits_of, register_method
from .weak_to_strong import EMATeacher, WeakToStrongMethod, check_ema_decay, mixed


@register_method
class UniMatchMethod(WeakToStrongMethod):
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
        logs, labeled, u0, partners, weight = self._start(batch, step)
        model = models[0]
        if weight <= 0:
            loss_sup = self._supervised_losses([logits_of(model, labeled["pixel_values"])], labeled["labels"], logs)
            return self._finish(loss_sup, None, weight, logs)
        num_labeled, num_unlabeled = labeled["pixel_values"].shape[0], u0.shape[0]
        weak_partners = self.eval_logits(model, partners)
        boxes = [self.boxes(u0, generator), self.boxes(u0, generator)]
        strong_views = [mixed(box, self.strong(partners, generator), self.strong(u0, generator)) for box in boxes]
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
        targets_s = [self.pseudo_targets(mixed(box, weak_partners, weak), logs=kept, log_name=f"pseudo_kept_u_{k}",
                                         count_for_bars=k == 1)  # class-aware bars count a step's labels once
                     for k, box in enumerate(boxes, start=1)]
        kept.log_mean("pseudo_kept_u")
        targets_fp = self.pseudo_targets(weak, count_for_bars=False)
        loss_s1 = self.pseudo_cross_entropy(logits_s1, targets_s[0])
        loss_s2 = self.pseudo_cross_entropy(logits_s2, targets_s[1])
        loss_fp = self.pseudo_cross_entropy(logits_fp, targets_fp)
        loss_u = 0.25 * loss_s1 + 0.25 * loss_s2 + 0.5 * loss_fp
        for name, value in (("loss_u_s1", loss_s1), ("loss_u_s2", loss_s2), ("loss_u_fp", loss_fp), ("loss_u", loss_u)):
            logs.add(name, value)
        return self._finish(loss_sup, loss_u, weight, logs)


@register_method
class UniMatchV2Method(EMATeacher, WeakToStrongMethod):
    """UniMatch V2 as its `unimatch_v2.py` runs it. See the module docstring."""

    name = "unimatch_v2"
    num_models, num_trained, num_unlabeled_streams = 2, 1, 1  # student and EMA teacher; partners: the batch flipped
    network_names = ("student", "teacher")
    default_export = "student"  # V2 evaluates both and keeps its best checkpoint by the student's score

    def __init__(self, sup_criterion, feature_dropout: float | None = None, ema_decay: float = 0.996, **kwargs):
        super().__init__(sup_criterion, **kwargs)
        self.complementary_dropout = 0.5 if feature_dropout is None else float(feature_dropout)
        if not 0 < self.complementary_dropout <= 1:
            raise ValueError(f"feature_dropout (unimatch_v2: the share of image pairs with complementary dropout) "
                             f"must be in (0, 1], got {self.complementary_dropout}")
        self.ema_decay = check_ema_decay(ema_decay)

    def init_networks(self, networks) -> None:
        super().init_networks(networks)
        self.copy_student_into_teacher(networks)

    def after_optimizer_step(self, networks, step: int) -> None:
        self.update_teacher(networks, step)

    def compute(self, models, batch, step, generator):
        logs, labeled, u0, _, weight = self._start(batch, step)
        student, teacher = models
        logits_x = logits_of(student, labeled["pixel_values"])
        loss_sup = self._supervised_losses([logits_x], labeled["labels"], logs)
        if weight <= 0:
            return self._finish(loss_sup, None, weight, logs)
        logs.add("ema_decay", self.ema_decay_at(step))
        weak = self.eval_logits(teacher, u0)
        boxes = [self.boxes(u0, generator), self.boxes(u0, generator)]
        strong_views = []
        for box in boxes:
            view = self.strong(u0, generator)
            strong_views.append(mixed(box, view.flip(0), view))
        seed = int(torch.randint(0, 2**62, (), generator=generator))  # the masks follow the call's generator
        logits_s1, logits_s2 = student(pixel_values=torch.cat(strong_views), perturbation_seed=seed,
                                       complementary_dropout=self.complementary_dropout).logits.chunk(2)
        kept = KeptFractions(logs)
        targets = [self.pseudo_targets(mixed(box, weak.flip(0), weak), logs=kept, log_name=f"pseudo_kept_u_{k}",
                                       count_for_bars=k == 1)  # class-aware bars count a step's labels once
                   for k, box in enumerate(boxes, start=1)]
        kept.log_mean("pseudo_kept_u")
        loss_s1 = self.pseudo_cross_entropy(logits_s1, targets[0])
        loss_s2 = self.pseudo_cross_entropy(logits_s2, targets[1])
        loss_u = (loss_s1 + loss_s2) / 2
        for name, value in (("loss_u_s1", loss_s1), ("loss_u_s2", loss_s2), ("loss_u", loss_u)):
            logs.add(name, value)
        return self._finish(loss_sup, loss_u, weight, logs)
