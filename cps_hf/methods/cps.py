"""Cross pseudo supervision (paper eq. 4-6), plain and with CutMix, as the original code computes it."""

from __future__ import annotations

import torch

from ..cutmix import mix
from ..losses import cross_supervision, pseudo_labels
from .base import KeptFractions, Method, MethodOutput, StepLogs, logits_of, pixel_weighted, register_method


def _cross_targets(method: Method, logits, predictions, logs: StepLogs, suffix: str) -> list[torch.Tensor]:
    """Each network's pseudo labels for the other: its argmax `predictions` themselves when
    `pseudo_label_threshold` is 0 (so the paper's CPS is untouched), otherwise with its
    low-confidence pixels set to ignore_index and the kept fractions logged."""
    kept = KeptFractions(logs)
    targets = [
        method.pseudo_targets(lg, pred, kept, f"pseudo_kept_{suffix}_{k}")
        for k, (lg, pred) in enumerate(zip(logits, predictions), start=1)
    ]
    kept.log_mean(f"pseudo_kept_{suffix}")
    return targets


@register_method
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
    value without building the concatenation.

    Table 4's rows: ``cps_on_labeled=False`` uses L_cps^u alone, ``cps_on_unlabeled=False`` uses
    L_cps^l alone; the method then needs no unlabelled batch at all (``num_unlabeled_streams`` is 0
    for that instance, so the loop neither loads nor forwards unlabelled images; the labelled
    batches and the number of steps are the same as with them). Both off is refused: that is
    ``supervised`` with a second network.

    ``pseudo_label_threshold`` tau > 0 (not in the paper): each network's argmax pixels with softmax
    confidence below tau are ignored as targets for the other network (``Method.pseudo_targets``), and
    each cross-entropy is divided by all pseudo-labelled pixels (``pseudo_label_normalize``);
    ``pseudo_kept_u`` / ``pseudo_kept_l`` log the kept fraction (mean over the two networks, each
    network's own as ``pseudo_kept_u_1``, ...). The agreement logs always compare the raw argmaxes.
    tau = 0 passes the argmax itself: bit-identical to the method without the option.

    When lambda is 0 (supervised warm-up) the unlabelled forwards and the CPS loss are skipped,
    so the warm-up costs what supervised training costs; those steps log ``cps_weight = 0`` and
    no ``loss_cps*``/``agreement_u*`` keys rather than made-up values.
    """

    name = "cps"
    num_models = 2
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
        # One argmax per logits tensor, shared by the CPS loss and the agreement logs.
        predictions_l = [pseudo_labels(logits) for logits in logits_l]
        self._log_agreement("agreement_l", *predictions_l, logs)
        if weight > 0:
            loss_cps_l = loss_cps_u = None
            if use_unlabeled:
                predictions_u = [pseudo_labels(logits) for logits in logits_u]
                targets_u = _cross_targets(self, logits_u, predictions_u, logs, "u")
                # == cps_loss(*logits_u) at threshold 0, equation 5 on the unlabelled batch
                loss_cps_u = cross_supervision(*logits_u, *targets_u, self.ignore_index,
                                               self.pseudo_denominator(targets_u[0]))
                logs.add("loss_cps_u", loss_cps_u)
            if self.cps_on_labeled:
                targets_l = _cross_targets(self, logits_l, predictions_l, logs, "l")
                loss_cps_l = cross_supervision(*logits_l, *targets_l, self.ignore_index,
                                               self.pseudo_denominator(targets_l[0]))
                logs.add("loss_cps_l", loss_cps_l)
            loss_cps = pixel_weighted(loss_cps_l, logits_l[0], loss_cps_u, logits_u[0] if logits_u else None)
            logs.add("loss_cps", loss_cps)
            if use_unlabeled:
                self._log_agreement("agreement_u", *predictions_u, logs)
            loss = loss + weight * loss_cps
        logs.add("loss", loss)
        return MethodOutput(loss, logs.to_floats())


@register_method
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

    ``pseudo_label_threshold`` tau > 0 ignores the pixels of y_k whose softmax confidence (of the
    mixed teacher logits, i.e. of the source image the pixel comes from) is below tau, and logs
    ``pseudo_kept_u`` (see ``CPSMethod``); tau = 0 is bit-identical to the method without it.
    ``cps_on_unlabeled=False`` is refused (no cross term would be left).
    """

    name = "cps_cutmix"
    num_models = 2
    num_unlabeled_streams = 2

    def __init__(self, sup_criterion, cps_on_labeled: bool | None = None, cps_on_unlabeled: bool | None = None,
                 **kwargs):
        if cps_on_labeled:
            raise ValueError(
                "method 'cps_cutmix' applies CPS to the unlabeled (CutMixed) images only, as the original; "
                "cps_on_labeled=True is not supported for it"
            )
        if cps_on_unlabeled is False:
            raise ValueError(
                "method 'cps_cutmix' applies CPS to the unlabeled (CutMixed) images; cps_on_unlabeled=False "
                "would leave no cross term (use --method supervised, or --method cps with --cps_on_unlabeled false)"
            )
        super().__init__(sup_criterion, **kwargs)

    def compute(self, models, batch, step, generator):
        logs = StepLogs()
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
            mask = self.cutmix_mask(u0, generator)
            with torch.no_grad():
                targets, kept = [], KeptFractions(logs)
                for k, model in enumerate(models, start=1):
                    mixed_logits = mix(logits_of(model, u0), logits_of(model, u1), mask)
                    targets.append(self.pseudo_targets(mixed_logits, pseudo_labels(mixed_logits), kept,
                                                       f"pseudo_kept_u_{k}"))
                kept.log_mean("pseudo_kept_u")
            mixed_images = mix(u0, u1, mask.to(u0.dtype))
            student_logits = [logits_of(model, mixed_images) for model in models]
            loss_cps = cross_supervision(*student_logits, *targets, self.ignore_index, self.pseudo_denominator(targets[0]))
            logs.add("loss_cps", loss_cps)
            logs.add("loss_cps_u", loss_cps)
            self._log_agreement("agreement_u", *(pseudo_labels(logits) for logits in student_logits), logs)

        logits_l = [logits_of(model, labeled["pixel_values"]) for model in models]
        loss = self._supervised_losses(logits_l, labeled["labels"], logs)
        self._log_agreement("agreement_l", *(pseudo_labels(logits) for logits in logits_l), logs)
        if loss_cps is not None:
            loss = loss + weight * loss_cps
        logs.add("loss", loss)
        return MethodOutput(loss, logs.to_floats())
