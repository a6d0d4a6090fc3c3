"""Training methods: what one step computes, given the networks and a batch.

The training loop stays the same for every method: it calls ``method(models, batch, step)``,
back-propagates ``output.loss`` and logs ``output.logs``. A method owns the forward passes, the
losses and the per-step logs; it never touches the optimizer.

Batch layout::

    {"labeled": {"pixel_values": (B, 3, H, W), "labels": (B, H, W)},
     "unlabeled": [{"pixel_values": (B_u, 3, H, W)}, ...]}   # num_unlabeled_streams entries

`models` is a list of callables (plain or DDP-wrapped) with ``model(pixel_values=x).logits``
giving (B, C, H, W) logits at the input size.

Methods (paper section 3, and what the original code does, see the facts note):

- ``supervised``: one network, L = L_s on the labelled batch.
- ``cps``: two networks, L = L_s1 + L_s2 + lambda * L_cps.
- ``cps_cutmix``: two networks, CPS on CutMixed unlabelled images only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np
import torch

from .cutmix import box_mask, mix
from .losses import agreement_counts, cross_supervision, pseudo_labels

METHOD_NAMES = ("supervised", "cps", "cps_cutmix")


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


class _StepLogs:
    """Collects tensor logs and turns them into floats with a single device-to-host copy."""

    def __init__(self):
        self._tensors: dict[str, torch.Tensor] = {}
        self._floats: dict[str, float] = {}

    def add(self, name: str, value: torch.Tensor | float) -> None:
        if isinstance(value, torch.Tensor):
            self._tensors[name] = value.detach().float().reshape(())
        else:
            self._floats[name] = float(value)

    def add_agreement(self, name: str, predictions_1, predictions_2, ignore_mask=None) -> None:
        agree, counted = agreement_counts(predictions_1, predictions_2, ignore_mask)
        self.add(name, agree.float() / counted.float())  # NaN when no pixel is counted

    def to_floats(self) -> dict[str, float]:
        logs = dict(self._floats)
        if self._tensors:
            values = torch.stack(list(self._tensors.values())).tolist()
            logs.update(zip(self._tensors.keys(), values))
        return logs


class Method:
    """Base class: checks the inputs, holds the CPS weight schedule, leaves the step to subclasses.

    Args:
        sup_criterion: the supervision loss, ``(logits, labels) -> scalar`` (CE or OHEM).
        cps_weight: lambda of equation 6 (ignored by ``supervised``).
        cps_weight_rampup_steps: if > 0, lambda is multiplied by a sigmoid ramp-up over that many
            steps (counted after the warm-up). The paper's presets do not use it.
        supervised_warmup_steps: lambda is 0 for the first N steps. The paper's presets do not use it.
        ignore_index: label value of unlabelled pixels.
        background_index: class left out of ``agreement_*_fg`` (Figure 7 ignores background);
            None to skip that log (e.g. Cityscapes, which has no background class).
        generator_seed: seed of the CutMix masks; the masks of a call depend on (seed, step, rank,
            micro_step) only, so a resumed run draws the same masks.
    """

    name: str = "base"
    num_models: int = 1
    num_unlabeled_streams: int = 0

    def __init__(
        self,
        sup_criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        cps_weight: float = 0.0,
        cps_weight_rampup_steps: int = 0,
        supervised_warmup_steps: int = 0,
        ignore_index: int = 255,
        background_index: int | None = 0,
        generator_seed: int = 0,
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
        self.supervised_warmup_steps = int(supervised_warmup_steps)
        self.ignore_index = ignore_index
        self.background_index = background_index
        self.generator_seed = int(generator_seed)

    def cps_weight_at(self, step: int) -> float:
        """lambda at `step`: 0 during the supervised warm-up, then the (optionally ramped) weight."""
        if step < self.supervised_warmup_steps:
            return 0.0
        return self.cps_weight * sigmoid_rampup(step - self.supervised_warmup_steps, self.cps_weight_rampup_steps)

    def generator(self, step: int, rank: int = 0, micro_step: int = 0) -> torch.Generator:
        """A CPU generator seeded from (generator_seed, step, rank, micro_step) alone."""
        key = [self.generator_seed, int(step), int(rank), int(micro_step)]
        seed = np.random.SeedSequence(key).generate_state(1)[0]
        return torch.Generator().manual_seed(int(seed))

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

    def _supervised_losses(self, logits_per_model, labels, logs: _StepLogs) -> torch.Tensor:
        """L_s of equation 4: the sum over networks of each one's supervision loss."""
        losses = [self.sup_criterion(logits, labels) for logits in logits_per_model]
        if len(losses) > 1:
            for k, loss in enumerate(losses, start=1):
                logs.add(f"loss_sup_{k}", loss)
        total = sum(losses[1:], losses[0])
        logs.add("loss_sup", total)
        return total

    def _log_agreement(self, name: str, predictions_1, predictions_2, logs: _StepLogs) -> None:
        """Figure 7's overlap ratio; `_fg` leaves out pixels both networks call background."""
        logs.add_agreement(name, predictions_1, predictions_2)
        if self.background_index is not None:
            background = (predictions_1 == self.background_index) & (predictions_2 == self.background_index)
            logs.add_agreement(f"{name}_fg", predictions_1, predictions_2, background)


def _logits(model, pixel_values: torch.Tensor) -> torch.Tensor:
    return model(pixel_values=pixel_values).logits


class SupervisedMethod(Method):
    """The baseline: one network trained on the labelled batch only."""

    name = "supervised"
    num_models = 1
    num_unlabeled_streams = 0

    def compute(self, models, batch, step, generator):
        logs = _StepLogs()
        labeled = batch["labeled"]
        logits = _logits(models[0], labeled["pixel_values"])
        loss = self._supervised_losses([logits], labeled["labels"], logs)
        logs.add("loss", loss)
        return MethodOutput(loss, logs.to_floats())


class CPSMethod(Method):
    """Cross pseudo supervision as in the original code (paper eq. 4-6).

    Each network sees the labelled and the unlabelled images in separate forward passes
    (separate BN batch statistics), in the original's order: net 1 labelled, net 1 unlabelled,
    net 2 labelled, net 2 unlabelled.

    How the original's loss maps onto equations 5-6: it concatenates the labelled and unlabelled
    logits and takes *one* mean cross-entropy over all pixels of the concatenation. With n_l and
    n_u pixels in the two batches that is

        L_cps(original) = (n_l * L_cps^l + n_u * L_cps^u) / (n_l + n_u),

    i.e. (L_cps^l + L_cps^u) / 2 when the batches have the same size, half the paper's
    L_cps^l + L_cps^u: the original's lambda (1.5 VOC, 6 Cityscapes) equals a paper-form lambda
    of half that. This class computes the two terms separately (logged as ``loss_cps_l`` and
    ``loss_cps_u``) and combines them with those pixel weights, which is exactly the original's
    value without building the concatenation. ``cps_on_labeled=False`` uses L_cps^u alone (the
    Table 4 ablation).

    When lambda is 0 (supervised warm-up) the unlabelled forwards and the CPS loss are skipped,
    so the warm-up costs what supervised training costs; those steps log ``cps_weight = 0`` and
    no ``loss_cps*``/``agreement_u*`` keys rather than made-up values.
    """

    name = "cps"
    num_models = 2
    num_unlabeled_streams = 1

    def __init__(self, sup_criterion, cps_on_labeled: bool = True, **kwargs):
        super().__init__(sup_criterion, **kwargs)
        self.cps_on_labeled = bool(cps_on_labeled)

    def compute(self, models, batch, step, generator):
        logs = _StepLogs()
        labeled, unlabeled = batch["labeled"], batch["unlabeled"][0]
        weight = self.cps_weight_at(step)
        logs.add("cps_weight", weight)

        logits_l, logits_u = [], []
        for model in models:
            logits_l.append(_logits(model, labeled["pixel_values"]))
            if weight > 0:
                logits_u.append(_logits(model, unlabeled["pixel_values"]))

        loss = self._supervised_losses(logits_l, labeled["labels"], logs)
        # One argmax per logits tensor, shared by the CPS loss and the agreement logs.
        predictions_l = [pseudo_labels(logits) for logits in logits_l]
        self._log_agreement("agreement_l", *predictions_l, logs)
        if weight > 0:
            predictions_u = [pseudo_labels(logits) for logits in logits_u]
            # == cps_loss(*logits_u), equation 5 on the unlabelled batch
            loss_cps_u = cross_supervision(*logits_u, *predictions_u, self.ignore_index)
            logs.add("loss_cps_u", loss_cps_u)
            if self.cps_on_labeled:
                loss_cps_l = cross_supervision(*logits_l, *predictions_l, self.ignore_index)
                logs.add("loss_cps_l", loss_cps_l)
                n_l, n_u = logits_l[0][:, 0].numel(), logits_u[0][:, 0].numel()
                loss_cps = (n_l * loss_cps_l + n_u * loss_cps_u) / (n_l + n_u)
            else:
                loss_cps = loss_cps_u
            logs.add("loss_cps", loss_cps)
            self._log_agreement("agreement_u", *predictions_u, logs)
            loss = loss + weight * loss_cps
        logs.add("loss", loss)
        return MethodOutput(loss, logs.to_floats())


class CPSCutMixMethod(Method):
    """CPS with box-mask CutMix on the unlabelled images, as in the original code.

    Per step, with one mask M per sample (drawn from `generator(step, rank, micro_step)`):

    1. pseudo labels, under no_grad and in train mode (as the original, so BN running statistics
       see u0 and u1): each network k runs on u0 and u1, its logits are mixed with M, and
       y_k = argmax(mix(logits_k(u0), logits_k(u1), M));
    2. both students run on mixed = u0 * (1 - M) + u1 * M, and
       L_cps = CE(p_1(mixed), y_2) + CE(p_2(mixed), y_1)   (unlabelled data only);
    3. L = L_s1 + L_s2 + lambda * L_cps.

    u0 and u1 come from two different unlabelled streams; the original's same-image behaviour is
    a data option, not a method option. ``agreement_u`` compares the two students on the mixed
    images. When lambda is 0 (warm-up) steps 1-2 are skipped, as in ``CPSMethod``.
    """

    name = "cps_cutmix"
    num_models = 2
    num_unlabeled_streams = 2

    def compute(self, models, batch, step, generator):
        logs = _StepLogs()
        labeled = batch["labeled"]
        u0 = batch["unlabeled"][0]["pixel_values"]
        u1 = batch["unlabeled"][1]["pixel_values"]
        if u0.shape != u1.shape:
            raise ValueError(
                f"method 'cps_cutmix': the two unlabeled streams must have the same shape, got "
                f"{tuple(u0.shape)} and {tuple(u1.shape)}"
            )
        weight = self.cps_weight_at(step)
        logs.add("cps_weight", weight)

        loss_cps = None
        if weight > 0:
            batch_size, _, height, width = u0.shape
            mask = box_mask(batch_size, height, width, generator=generator, device=u0.device)
            with torch.no_grad():
                targets = []
                for model in models:
                    mixed_logits = mix(_logits(model, u0), _logits(model, u1), mask)
                    targets.append(pseudo_labels(mixed_logits))
            mixed_images = mix(u0, u1, mask.to(u0.dtype))
            student_logits = [_logits(model, mixed_images) for model in models]
            loss_cps = cross_supervision(*student_logits, *targets, self.ignore_index)
            logs.add("loss_cps", loss_cps)
            logs.add("loss_cps_u", loss_cps)
            self._log_agreement("agreement_u", *(pseudo_labels(logits) for logits in student_logits), logs)

        logits_l = [_logits(model, labeled["pixel_values"]) for model in models]
        loss = self._supervised_losses(logits_l, labeled["labels"], logs)
        self._log_agreement("agreement_l", *(pseudo_labels(logits) for logits in logits_l), logs)
        if loss_cps is not None:
            loss = loss + weight * loss_cps
        logs.add("loss", loss)
        return MethodOutput(loss, logs.to_floats())


def build_method(
    name: str,
    sup_criterion: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    cps_weight: float,
    cps_weight_rampup_steps: int = 0,
    supervised_warmup_steps: int = 0,
    cps_on_labeled: bool | None = None,
    ignore_index: int = 255,
    generator_seed: int = 0,
    background_index: int | None = 0,
) -> Method:
    """Build a method by name.

    `cps_on_labeled`: None keeps the original's choice (True for ``cps``; ``cps_cutmix`` uses
    unlabelled data only and refuses True). ``supervised`` ignores the CPS arguments.
    """
    if name not in METHOD_NAMES:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHOD_NAMES)}")
    common = dict(
        cps_weight=cps_weight,
        cps_weight_rampup_steps=cps_weight_rampup_steps,
        supervised_warmup_steps=supervised_warmup_steps,
        ignore_index=ignore_index,
        background_index=background_index,
        generator_seed=generator_seed,
    )
    if name == "supervised":
        return SupervisedMethod(sup_criterion, **common)
    if name == "cps":
        return CPSMethod(sup_criterion, cps_on_labeled=True if cps_on_labeled is None else cps_on_labeled, **common)
    if cps_on_labeled:
        raise ValueError(
            "method 'cps_cutmix' applies CPS to the unlabeled (CutMixed) images only, as the original; "
            "cps_on_labeled=True is not supported for it"
        )
    return CPSCutMixMethod(sup_criterion, **common)
