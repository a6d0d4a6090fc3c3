"""Per-class pseudo labels: the shares the erasure alarm watches, and class-aware (FlexMatch-style) thresholds.

Pseudo labels confirm the majority: on street scenes CPS lifted the large classes and erased the rare ones
(pedestrian 24 -> 0.5 IoU). Two things here act against that, for every method that makes pseudo labels
through `Method.pseudo_targets`:

- `log_class_shares` logs each class's share of the kept pseudo labels on unlabeled images
  (``pseudo_share_u/<class>``) and of the labeled pixels (``labeled_share/<class>``), which
  `cps_hf.erasure_alarm` compares over logging windows;
- `ClassAwareThreshold` lowers the confidence bar of the classes the network has learned less, as FlexMatch
  (Zhang et al. 2021) does for classification: with ``sigma_c`` the pixels predicted as ``c`` above the fixed
  threshold ``tau`` and ``sigma_0`` those under it, ``beta_c = sigma_c / max(max_k sigma_k, sigma_0)`` and
  ``tau_c = tau * beta_c / (2 - beta_c)`` (its warm-up form and convex mapping). FlexMatch counts each
  sample's latest prediction over the whole unlabeled set; pixels have no such memory here, so ``sigma`` is
  an exponential moving average of each step's counts (momentum 0.99, about the last hundred steps), a
  choice of ours. Like FlexMatch, every bar starts at 0 and rises as classes are learned.
"""

from __future__ import annotations

from typing import Sequence

import torch

MOMENTUM = 0.99


def log_class_shares(logs, name: str, labels: torch.Tensor, class_names: Sequence[str], ignore_index: int) -> None:
    """``name/<class>``: the class's share of the pixels of `labels` that are not `ignore_index` (summed over
    the calls of one step with the same `name`); every class is logged, 0 where absent."""
    num_classes = len(class_names)
    with torch.no_grad():
        labels = labels.flatten()
        counted = (labels != ignore_index) & (labels < num_classes)
        # every other value goes to an extra bin that is dropped: no boolean indexing (a copy and a sync)
        counts = torch.bincount(torch.where(counted, labels, num_classes), minlength=num_classes + 1)[:num_classes]
        logs.add_counts(name, counts, counts.sum().expand(num_classes), class_names)


class ClassAwareThreshold:
    """FlexMatch-style per-class thresholds from running counts of confident predictions (module docstring).

    The counts are part of the run's state: `state_dict` / `load_state_dict` let the trainer checkpoint them,
    so a resumed run uses the same bars."""

    def __init__(self, momentum: float = MOMENTUM):
        self.momentum = float(momentum)
        self.confident: torch.Tensor | None = None  # sigma_c, per class
        self.unconfident: torch.Tensor | None = None  # sigma_0

    def thresholds(self, tau: float, num_classes: int, device) -> torch.Tensor:
        """tau_c for every class (zeros before the first update, as FlexMatch's warm-up)."""
        if self.confident is None:
            return torch.zeros(num_classes, device=device)
        confident, unconfident = self.confident.to(device), self.unconfident.to(device)
        beta = confident / torch.maximum(confident.max(), unconfident).clamp_min(1e-12)
        return tau * beta / (2.0 - beta)

    def update(self, predictions: torch.Tensor, confidence: torch.Tensor, tau: float, num_classes: int) -> None:
        """Fold one step's pseudo labels into the counts: argmax classes at confidence >= tau, and the rest."""
        with torch.no_grad():
            above = confidence >= tau
            counts = torch.bincount(predictions[above].flatten(), minlength=num_classes)[:num_classes].float()
            rest = (~above).sum().float()
            if self.confident is None:
                self.confident, self.unconfident = counts, rest
            else:
                m = self.momentum
                self.confident = m * self.confident.to(counts.device) + (1 - m) * counts
                self.unconfident = m * self.unconfident.to(rest.device) + (1 - m) * rest

    def state_dict(self) -> dict:
        return {"momentum": self.momentum,
                "confident": None if self.confident is None else self.confident.cpu(),
                "unconfident": None if self.unconfident is None else self.unconfident.cpu()}

    def load_state_dict(self, state: dict) -> None:
        self.momentum = float(state["momentum"])
        self.confident, self.unconfident = state["confident"], state["unconfident"]
