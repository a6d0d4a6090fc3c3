"""Cross probability consistency (paper eq. 7, the last row of Table 4): CPS's two networks, with
the squared L2 distance between their softmax probabilities in place of the cross pseudo labels."""

from __future__ import annotations

from ..losses import cross_probability_consistency, pseudo_labels
from .base import Method, MethodOutput, StepLogs, pixel_weighted, register_method


@register_method
class CPCMethod(Method):
    """Two networks pulled towards each other's softmax probabilities (paper eq. 7, Figure 1 (b)).

    Everything but the cross term is ``cps`` (cps.py): the same two networks and forward order (net
    1 labelled, net 1 unlabelled, net 2 labelled, net 2 unlabelled, each batch in its own forward),
    the same supervision loss L_s, lambda (``cps_weight`` with its warm-up and ramp-up) and the
    same agreement logs. The cross term is

        L_cpc = ell_2(p_1, sg p_2) + ell_2(p_2, sg p_1),   ell_2(p, q) = ||p - q||_2^2 per pixel,

    averaged over pixels and images (``losses.cross_probability_consistency``; ``sg`` = no gradient):
    each network is pulled towards the other's probabilities as towards a target, exactly as in
    CPS each network is trained by the other's pseudo labels. The value is eq. 7's; without the
    stop-gradients every gradient would be twice as large (the same as doubling lambda). See that
    function's docstring for the reasoning.

    Eq. 7 averages over D = D^l u D^u, the labelled and unlabelled images together, so with both
    on the method uses the pixel-weighted mean (n_l L_cpc^l + n_u L_cpc^u) / (n_l + n_u), the same
    combination ``cps`` uses for L_cps^l and L_cps^u; L = L_s + lambda * L_cpc. Table 4's rows:
    ``cps_on_labeled=False`` keeps L_cpc^u only, ``cps_on_unlabeled=False`` L_cpc^l only (then no
    unlabelled batch is loaded or forwarded: ``num_unlabeled_streams`` is 0); both off is refused.
    Logs ``loss_cpc_l``, ``loss_cpc_u``, ``loss_cpc`` (the combined term lambda multiplies).

    There are no pseudo labels, so ``pseudo_label_threshold`` > 0 is refused rather than ignored.
    The paper does not give a lambda for CPC; ``cps_weight`` is used as given.
    """

    name = "cpc"
    num_models = 2
    num_unlabeled_streams = 1

    def __init__(self, sup_criterion, cps_on_labeled: bool = True, cps_on_unlabeled: bool = True, **kwargs):
        if kwargs.get("pseudo_label_threshold"):
            raise ValueError(
                "method 'cpc' compares probabilities and makes no pseudo labels; pseudo_label_threshold "
                f"must be 0, got {kwargs['pseudo_label_threshold']}"
            )
        super().__init__(sup_criterion, **kwargs)
        self._init_cross_switches(cps_on_labeled, cps_on_unlabeled, "consistency term")

    def compute(self, models, batch, step, generator):
        logs = StepLogs()
        labeled = batch["labeled"]
        weight = self.cps_weight_at(step)
        logs.add("cps_weight", weight)
        use_unlabeled = weight > 0 and self.cps_on_unlabeled
        logits_l, logits_u = self._forward_labeled_and_unlabeled(models, batch, use_unlabeled)

        loss = self._supervised_losses(logits_l, labeled["labels"], logs)
        self._log_agreement("agreement_l", *(pseudo_labels(logits) for logits in logits_l), logs)
        if weight > 0:
            loss_l = loss_u = None
            if use_unlabeled:
                loss_u = cross_probability_consistency(*logits_u)
                logs.add("loss_cpc_u", loss_u)
            if self.cps_on_labeled:
                loss_l = cross_probability_consistency(*logits_l)
                logs.add("loss_cpc_l", loss_l)
            loss_cpc = pixel_weighted(loss_l, logits_l[0], loss_u, logits_u[0] if logits_u else None)
            logs.add("loss_cpc", loss_cpc)
            if use_unlabeled:
                self._log_agreement("agreement_u", *(pseudo_labels(logits) for logits in logits_u), logs)
            loss = loss + weight * loss_cpc
        logs.add("loss", loss)
        return MethodOutput(loss, logs.to_floats())
