"""Single-network pseudo supervision (paper eq. 9, Table 6): the "downgraded" CPS in which the
two networks are the same one, plain and with CutMix."""

from __future__ import annotations

import torch

from ..cutmix import mix
from .base import Method, MethodOutput, StepLogs, has_stochastic_layers, logits_of, pixel_weighted, register_method


@register_method
class SPSMethod(Method):
    """One network supervised by its own argmax on the same input (paper eq. 9, Table 6 "SPS w/o
    CutMix"):

        X -> f(theta) -> P  <-- CE --  Y = argmax P (no gradient)  <-  P <- f(theta) <- X

    i.e. CPS with theta_1 = theta_2:  L = L_s + lambda * L_sps,  L_sps = CE(p, sg y). Both streams
    of eq. 9 get the same input and the same weights. When the network has no randomness (no
    dropout, no drop-path; BN uses the batch's statistics in train mode), the pseudo labels are the
    argmax of the very logits being trained and one forward per batch computes both streams (a
    second, no-grad forward would give the same logits and only update the BN running statistics
    twice). When it has (``--drop_path_rate``, an encoder with dropout), the two streams of eq. 9
    draw different masks, as CPS's two networks would: the pseudo labels then come from a second
    forward pass of their own, under no_grad and in train mode, before the pass that is trained
    (``init_networks`` finds out which case a run is in; ``stochastic_passes`` says it).

    As in ``cps``, the term is applied to the labelled and the unlabelled images, each in its own
    forward (labelled first), combined pixel-weighted as (n_l L_sps^l + n_u L_sps^u) / (n_l + n_u),
    with the same ``cps_weight`` schedule (lambda = 0 skips the unlabelled forward) and the same
    switches ``cps_on_labeled`` / ``cps_on_unlabeled`` (both off is refused; unlabelled off loads no
    unlabelled batch). Logs ``loss_sps_l``, ``loss_sps_u``, ``loss_sps``.

    What this loss does: with hard argmax targets from the same prediction, the gradient on the
    logits is softmax(z) - onehot(argmax z): it only makes the network more confident in what it
    already predicts, pixel by pixel, like entropy minimisation (hard-label self-training on the
    fly). Nothing outside the network can correct a wrong prediction, so errors are reinforced.
    The paper reports it (Table 6) as the ablation that isolates the *cross* in cross pseudo
    supervision: same pseudo-label loss, same data, one network instead of two, and it is much
    worse (59.5 vs 68.2 mIoU at VOC 1/16, ResNet-50): the other network's differing pseudo labels
    act as the regulariser (Section 4, "Single-network pseudo supervision").

    ``pseudo_label_threshold`` tau > 0 (not in the paper) ignores pixels whose confidence is below
    tau (``Method.pseudo_targets``) and logs the kept fractions ``pseudo_kept_u`` / ``pseudo_kept_l``.
    """

    name = "sps"
    num_models = 1
    num_unlabeled_streams = 1

    def __init__(self, sup_criterion, cps_on_labeled: bool = True, cps_on_unlabeled: bool = True, **kwargs):
        super().__init__(sup_criterion, **kwargs)
        self._init_cross_switches(cps_on_labeled, cps_on_unlabeled, "pseudo supervision")
        self.stochastic_passes = False  # set by init_networks: dropout / drop-path make the two streams differ

    def init_networks(self, networks) -> None:
        super().init_networks(networks)
        self.stochastic_passes = has_stochastic_layers(networks[0])

    def _self_supervision(self, model, images, logits, logs, log_name):
        """CE(p, sg y): y the (optionally thresholded) argmax of the same logits, or, when the network
        is stochastic, of a no-grad pass of its own on the same images (eq. 9's other stream)."""
        if self.stochastic_passes:
            with torch.no_grad():
                source = logits_of(model, images)
        else:
            source = logits
        return self.pseudo_cross_entropy(logits, self.pseudo_targets(source, None, logs, log_name))

    def compute(self, models, batch, step, generator):
        logs = StepLogs()
        labeled = batch["labeled"]
        model = models[0]
        weight = self.cps_weight_at(step)
        logs.add("cps_weight", weight)
        use_unlabeled = weight > 0 and self.cps_on_unlabeled

        logits_l = logits_of(model, labeled["pixel_values"])
        logits_u = logits_of(model, batch["unlabeled"][0]["pixel_values"]) if use_unlabeled else None
        loss = self._supervised_losses([logits_l], labeled["labels"], logs)
        if weight > 0:
            loss_l = loss_u = None
            if use_unlabeled:
                loss_u = self._self_supervision(model, batch["unlabeled"][0]["pixel_values"], logits_u, logs,
                                                "pseudo_kept_u")
                logs.add("loss_sps_u", loss_u)
            if self.cps_on_labeled:
                loss_l = self._self_supervision(model, labeled["pixel_values"], logits_l, logs, "pseudo_kept_l")
                logs.add("loss_sps_l", loss_l)
            loss_sps = pixel_weighted(loss_l, logits_l, loss_u, logits_u)
            logs.add("loss_sps", loss_sps)
            loss = loss + weight * loss_sps
        logs.add("loss", loss)
        return MethodOutput(loss, logs.to_floats())


@register_method
class SPSCutMixMethod(Method):
    """Single-network pseudo supervision with box-mask CutMix (paper Section 4, Table 6 "SPS w/
    CutMix"): ``cps_cutmix`` with one network.

    Per step, with one mask M per sample (drawn from `generator(step, rank, micro_step)`, so a
    resumed run draws the same masks):

    1. pseudo labels, under no_grad and in train mode (as ``cps_cutmix``'s teachers): the network
       runs on u0 and u1 (two unlabelled streams), its logits are mixed with M and
       y = argmax(mix(logits(u0), logits(u1), M)) (thresholded by ``pseudo_label_threshold``);
    2. the same network runs on mixed = u0 * (1 - M) + u1 * M and L_sps = CE(p(mixed), y):
       back-propagation only through the CutMixed image, as the paper says;
    3. L = L_s + lambda * L_sps, with L_s on the labelled batch (forwarded last).

    Unlabelled images only, as ``cps_cutmix`` (``cps_on_labeled=True`` and
    ``cps_on_unlabeled=False`` are refused). lambda = 0 (warm-up) skips steps 1-2. Logs
    ``loss_sps`` (= ``loss_sps_u``) and, with a threshold, ``pseudo_kept_u``.

    Unlike plain ``sps`` the target is not the prediction being trained: the network must predict
    on the mixed image what it predicted on the two clean sources, an input perturbation
    (consistency) that the paper credits to CutMix-Seg; Table 6 shows CPS still gains over it,
    i.e. the network perturbation helps on top of the input perturbation.
    """

    name = "sps_cutmix"
    num_models = 1
    num_unlabeled_streams = 2

    def __init__(self, sup_criterion, cps_on_labeled: bool | None = None, cps_on_unlabeled: bool | None = None,
                 **kwargs):
        if cps_on_labeled:
            raise ValueError(
                "method 'sps_cutmix' applies pseudo supervision to the unlabeled (CutMixed) images only, as "
                "cps_cutmix; cps_on_labeled=True is not supported for it"
            )
        if cps_on_unlabeled is False:
            raise ValueError(
                "method 'sps_cutmix' applies pseudo supervision to the unlabeled images; cps_on_unlabeled=False "
                "would leave no such term (use --method supervised)"
            )
        super().__init__(sup_criterion, **kwargs)

    def compute(self, models, batch, step, generator):
        logs = StepLogs()
        labeled = batch["labeled"]
        model = models[0]
        u0 = batch["unlabeled"][0]["pixel_values"]
        u1 = batch["unlabeled"][1]["pixel_values"]
        if u0.shape != u1.shape:
            raise ValueError(
                f"method 'sps_cutmix': the two unlabeled streams must have the same shape, got "
                f"{tuple(u0.shape)} and {tuple(u1.shape)}"
            )
        weight = self.cps_weight_at(step)
        logs.add("cps_weight", weight)

        loss_sps = None
        if weight > 0:
            mask = self.cutmix_mask(u0, generator)
            with torch.no_grad():
                mixed_logits = mix(logits_of(model, u0), logits_of(model, u1), mask)
                target = self.pseudo_targets(mixed_logits, None, logs, "pseudo_kept_u")
            student_logits = logits_of(model, mix(u0, u1, mask.to(u0.dtype)))
            loss_sps = self.pseudo_cross_entropy(student_logits, target)
            logs.add("loss_sps", loss_sps)
            logs.add("loss_sps_u", loss_sps)

        logits_l = logits_of(model, labeled["pixel_values"])
        loss = self._supervised_losses([logits_l], labeled["labels"], logs)
        if loss_sps is not None:
            loss = loss + weight * loss_sps
        logs.add("loss", loss)
        return MethodOutput(loss, logs.to_floats())
