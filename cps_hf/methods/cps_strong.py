"""CPS across strong views (none of the references has it).

``cps_strong``: N networks (`--num_networks`, 2 by default) as in CPS, each network's weak-view argmax
supervising every *other* network's prediction on one shared strong view, averaged over the peers as n-CPS
does; ``L = sum_i L_s,i + lambda * sum_i mean_{j != i} CE(p_i(strong), y_j(weak))``, CPS's form, with CPS's
default threshold (0: off) and two different images in a CutMix. It asks whether cross supervision still
adds anything once strong views exist. What every weak-to-strong method shares is in weak_to_strong.py.
"""

from __future__ import annotations

import torch

from ..losses import pseudo_labels
from .base import KeptFractions, MethodOutput, logits_of, register_method
from .weak_to_strong import WeakToStrongMethod, mixed


@register_method
class CPSStrongMethod(WeakToStrongMethod):
    """CPS across strong views: each network's weak-view pseudo labels supervise the other networks' strong
    view. See the module docstring."""

    name = "cps_strong"
    num_models = 2
    default_threshold = 0.0  # CPS's: no threshold
    default_same_image = False  # CPS's: two different images in a CutMix

    def __init__(self, sup_criterion, num_networks: int = 2, **kwargs):
        super().__init__(sup_criterion, **kwargs)
        if int(num_networks) != num_networks or num_networks < 2:
            raise ValueError(f"method 'cps_strong': num_networks must be an integer >= 2, got {num_networks}")
        self.num_models = int(num_networks)

    def _finish(self, loss_sup, loss_u, weight, logs):
        """CPS's form: L_s (summed over networks) + lambda * L_cps, no halving."""
        loss = loss_sup + weight * loss_u if loss_u is not None else loss_sup
        logs.add("loss", loss)
        return MethodOutput(loss, logs.to_floats())

    def compute(self, models, batch, step, generator):
        logs, labeled, u0, partners, weight = self._start(batch, step)
        if weight <= 0:
            logits_l = [logits_of(model, labeled["pixel_values"]) for model in models]
            return self._finish(self._supervised_losses(logits_l, labeled["labels"], logs), None, weight, logs)
        num_labeled = labeled["pixel_values"].shape[0]
        box = self.boxes(u0, generator)
        strong = mixed(box, self.strong(partners, generator), self.strong(u0, generator))
        logits_x, targets, logits_s = [], [], []
        kept = KeptFractions(logs)
        for k, model in enumerate(models, start=1):
            weak_partners = self.eval_logits(model, partners)
            clean_x, weak = logits_of(model, torch.cat([labeled["pixel_values"], u0])).split(
                [num_labeled, u0.shape[0]])
            logits_x.append(clean_x)
            targets.append(self.pseudo_targets(mixed(box, weak_partners, weak.detach()), logs=kept,
                                               log_name=f"pseudo_kept_u_{k}"))
            logits_s.append(logits_of(model, strong))
        kept.log_mean("pseudo_kept_u")
        loss_sup = self._supervised_losses(logits_x, labeled["labels"], logs)
        loss_u = None
        for i, student in enumerate(logits_s):
            peers = [self.pseudo_cross_entropy(student, target) for j, target in enumerate(targets) if j != i]
            term = sum(peers[1:], peers[0]) / len(peers)
            loss_u = term if loss_u is None else loss_u + term
        logs.add("loss_cps", loss_u)
        self._log_agreement("agreement_u", pseudo_labels(logits_s[0]), pseudo_labels(logits_s[1]), logs)  # networks 1, 2
        return self._finish(loss_sup, loss_u, weight, logs)
