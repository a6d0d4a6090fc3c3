"""n-CPS (Filipiak et al., 2021): cross pseudo supervision among N networks, plain and with CutMix.

Every network is supervised by the argmax of every other network:

    L_cps = sum_i w * sum_{j != i} CE(p_i, y_j),   w = 1 / (N - 1) (default) or 1 (``ncps_sum``)

and L_s sums the supervision loss over all N networks. With N = 2 (and either w) this is exactly
the CPS loss of cps.py, ``CE(p_1, y_2) + CE(p_2, y_1)``, added in the same order (w = 1/(N-1) = 1 is not
applied, so no rounding differs), so ``ncps`` and
``ncps_cutmix`` with two networks reproduce ``cps`` and ``cps_cutmix`` (losses, logs, gradients,
forward order, CutMix masks). This module reuses no code of cps.py, so edits there do not move
n-CPS; tests/test_methods_ncps.py checks the N = 2 equivalence.

The default w = 1 / (N - 1) is the n-CPS reference code's (AI-Clearing/n-cps divides each network's
cross term by n - 1, so every network's pseudo-label weight equals CPS's at any N). ``ncps_sum``
keeps the plain sum, which gives each network N - 1 times CPS's unlabeled weight (twice at N = 3);
the generated study saw that collapse at 1/4 labels (docs/study/results.md).
"""

from __future__ import annotations

import torch

from ..cutmix import mix
from ..losses import cross_entropy, pseudo_labels
from .base import KeptFractions, Method, MethodOutput, StepLogs, logits_of, pixel_weighted, register_method


class _PairRatios(StepLogs):
    """Collects every pair's agreement ratios (StepLogs.add_agreement calls `add`) instead of logging them."""

    def __init__(self):
        super().__init__()
        self.ratios: dict[str, list[torch.Tensor]] = {}

    def add(self, name, value) -> None:
        self.ratios.setdefault(name, []).append(torch.as_tensor(value).detach().float().reshape(()))


class _NCPSBase(Method):
    """What ``ncps`` and ``ncps_cutmix`` share: N networks, the N-way cross loss, pairwise agreement."""

    num_models = 3  # the default; each instance sets its own from num_networks

    def __init__(self, sup_criterion, num_networks: int = 3, ncps_sum: bool = False, **kwargs):
        super().__init__(sup_criterion, **kwargs)
        if int(num_networks) != num_networks or num_networks < 2:
            raise ValueError(f"method {self.name!r}: num_networks must be an integer >= 2, got {num_networks}")
        self.num_models = int(num_networks)  # read by the loop (build_networks), trained_count and names()
        self.ncps_sum = bool(ncps_sum)

    def _targets(self, logits, predictions, logs: StepLogs, suffix: str) -> list[torch.Tensor]:
        """Each network's pseudo labels for its peers (argmax, or thresholded by
        `pseudo_label_threshold`; then ``pseudo_kept_{suffix}_k`` per network and their mean
        ``pseudo_kept_{suffix}`` are logged)."""
        kept = KeptFractions(logs)
        targets = [
            self.pseudo_targets(lg, pred, kept, f"pseudo_kept_{suffix}_{k}")
            for k, (lg, pred) in enumerate(zip(logits, predictions), start=1)
        ]
        kept.log_mean(f"pseudo_kept_{suffix}")
        return targets

    def _cross_loss(self, student_logits, targets) -> torch.Tensor:
        """sum_i w * sum_{j != i} CE(student_i, target_j), w = 1 / (N - 1) unless `ncps_sum`; for N = 2 the
        same additions as `losses.cross_supervision` (w = 1 is not multiplied in)."""
        scale = 1.0 / (self.num_models - 1) if not self.ncps_sum and self.num_models > 2 else None
        total = None
        for i, logits in enumerate(student_logits):
            own = None
            for j, target in enumerate(targets):
                if j == i:
                    continue
                term = cross_entropy(logits, target, self.ignore_index, self.pseudo_denominator(target))
                own = term if own is None else own + term
            if scale is not None:
                own = own * scale
            total = own if total is None else total + own
        return total

    def _log_mean_agreement(self, name: str, predictions, logs: StepLogs) -> None:
        """Mean over the N(N-1)/2 pairs of `_log_agreement`'s ratios (for N = 2 the one pair's, as
        ``cps`` logs it); the ``_fg`` mean leaves out pairs with no counted pixel (NaN only if none has one)."""
        if len(predictions) == 2:
            self._log_agreement(name, *predictions, logs)
            return
        pairs = _PairRatios()
        for i in range(len(predictions)):
            for j in range(i + 1, len(predictions)):
                self._log_agreement(name, predictions[i], predictions[j], pairs)
        for key, values in pairs.ratios.items():
            logs.add(key, torch.stack(values).nanmean())


@register_method
class NCPSMethod(_NCPSBase):
    """n-CPS on labelled + unlabelled images: ``cps`` (cps.py) generalised to N networks.

    Same forward order as ``cps`` (net 1 labelled, net 1 unlabelled, net 2 labelled, ...), the same
    pixel-weighted combination of the labelled and unlabelled cross terms
    ``(n_l * L_cps^l + n_u * L_cps^u) / (n_l + n_u)`` (logged as ``loss_cps_l``, ``loss_cps_u``,
    ``loss_cps``), and the same warm-up behaviour (lambda = 0 skips the unlabelled forwards).
    ``cps_on_labeled=False`` keeps L_cps^u only; ``cps_on_unlabeled=False`` keeps L_cps^l only
    (no unlabelled stream is loaded or forwarded). ``agreement_*`` are the mean pairwise agreements.
    ``pseudo_label_threshold`` > 0 ignores low-confidence pseudo-labelled pixels and logs
    ``pseudo_kept_{u,l}`` (mean over networks) and ``pseudo_kept_{u,l}_k``, as ``cps`` does.
    """

    name = "ncps"
    num_unlabeled_streams = 1

    def __init__(self, sup_criterion, cps_on_labeled: bool = True, cps_on_unlabeled: bool = True, **kwargs):
        super().__init__(sup_criterion, **kwargs)
        self._init_cross_switches(cps_on_labeled, cps_on_unlabeled, "cross term")

    def compute(self, models, batch, step, generator):
        logs = StepLogs()
        labeled = batch["labeled"]
        weight = self.cps_weight_at(step)
        logs.add("cps_weight", weight)
        use_unlabeled = weight > 0 and self.cps_on_unlabeled
        logits_l, logits_u = self._forward_labeled_and_unlabeled(models, batch, use_unlabeled)

        loss = self._supervised_losses(logits_l, labeled["labels"], logs)
        predictions_l = [pseudo_labels(logits) for logits in logits_l]
        self._log_mean_agreement("agreement_l", predictions_l, logs)
        if weight > 0:
            loss_cps_l = loss_cps_u = None
            if use_unlabeled:
                predictions_u = [pseudo_labels(logits) for logits in logits_u]
                targets_u = self._targets(logits_u, predictions_u, logs, "u")
                loss_cps_u = self._cross_loss(logits_u, targets_u)
                logs.add("loss_cps_u", loss_cps_u)
            if self.cps_on_labeled:
                targets_l = self._targets(logits_l, predictions_l, logs, "l")
                loss_cps_l = self._cross_loss(logits_l, targets_l)
                logs.add("loss_cps_l", loss_cps_l)
            loss_cps = pixel_weighted(loss_cps_l, logits_l[0], loss_cps_u, logits_u[0] if logits_u else None)
            logs.add("loss_cps", loss_cps)
            if use_unlabeled:
                self._log_mean_agreement("agreement_u", predictions_u, logs)
            loss = loss + weight * loss_cps
        logs.add("loss", loss)
        return MethodOutput(loss, logs.to_floats())


@register_method
class NCPSCutMixMethod(_NCPSBase):
    """n-CPS with box-mask CutMix on the unlabelled images: ``cps_cutmix`` generalised to N networks.

    One mask M per sample from `generator(step, rank, micro_step)`; under no_grad and in train mode
    each network k runs on u0 and u1 and y_k = argmax(mix(logits_k(u0), logits_k(u1), M)); every
    network then runs on the mixed image and learns from the N-1 others' y_j (unlabelled data
    only); then the labelled forwards. ``agreement_u`` is the students' mean pairwise agreement on
    the mixed images. lambda = 0 (warm-up) skips the unlabelled work, as in ``cps_cutmix``.
    """

    name = "ncps_cutmix"
    num_unlabeled_streams = 2

    def __init__(self, sup_criterion, cps_on_labeled: bool | None = None, cps_on_unlabeled: bool | None = None,
                 **kwargs):
        if cps_on_labeled:
            raise ValueError(
                "method 'ncps_cutmix' applies CPS to the unlabeled (CutMixed) images only, as cps_cutmix; "
                "cps_on_labeled=True is not supported for it"
            )
        if cps_on_unlabeled is False:
            raise ValueError("method 'ncps_cutmix' applies CPS to the unlabeled images; cps_on_unlabeled=False "
                             "would leave no cross term (use --method supervised)")
        super().__init__(sup_criterion, **kwargs)

    def compute(self, models, batch, step, generator):
        logs = StepLogs()
        labeled = batch["labeled"]
        u0 = batch["unlabeled"][0]["pixel_values"]
        u1 = batch["unlabeled"][1]["pixel_values"]
        if u0.shape != u1.shape:
            raise ValueError(
                f"method 'ncps_cutmix': the two unlabeled streams must have the same shape, got "
                f"{tuple(u0.shape)} and {tuple(u1.shape)}"
            )
        weight = self.cps_weight_at(step)
        logs.add("cps_weight", weight)

        loss_cps = None
        if weight > 0:
            mask = self.cutmix_mask(u0, generator)
            kept = KeptFractions(logs)
            with torch.no_grad():
                targets = []
                for k, model in enumerate(models, start=1):  # one network's mixed logits alive at a time
                    mixed_logits = mix(logits_of(model, u0), logits_of(model, u1), mask)
                    targets.append(self.pseudo_targets(mixed_logits, pseudo_labels(mixed_logits), kept,
                                                       f"pseudo_kept_u_{k}"))
            kept.log_mean("pseudo_kept_u")
            mixed_images = mix(u0, u1, mask.to(u0.dtype))
            student_logits = [logits_of(model, mixed_images) for model in models]
            loss_cps = self._cross_loss(student_logits, targets)
            logs.add("loss_cps", loss_cps)
            logs.add("loss_cps_u", loss_cps)
            self._log_mean_agreement("agreement_u", [pseudo_labels(lg) for lg in student_logits], logs)

        logits_l = [logits_of(model, labeled["pixel_values"]) for model in models]
        loss = self._supervised_losses(logits_l, labeled["labels"], logs)
        self._log_mean_agreement("agreement_l", [pseudo_labels(lg) for lg in logits_l], logs)
        if loss_cps is not None:
            loss = loss + weight * loss_cps
        logs.add("loss", loss)
        return MethodOutput(loss, logs.to_floats())
