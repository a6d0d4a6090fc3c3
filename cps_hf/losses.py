"""Losses of Cross Pseudo Supervision (Chen et al., CVPR 2021, section 3).

Everything here works on logits at the label resolution: `(B, C, H, W)` logits against
`(B, H, W)` integer labels, where `ignore_index` marks pixels without a label.

- `cross_entropy`: the supervision loss L_s of equation 4 (one network at a time).
- `OhemCrossEntropy`: the Cityscapes supervision loss of the original code
  (`ProbOhemCrossEntropy2d`).
- `cps_loss`: the cross pseudo supervision loss of equation 5 for one batch.
- `cross_probability_consistency`: the cross probability consistency loss of equation 7 (the
  Table 4 comparison, method ``cpc``).
- `prediction_agreement`: the overlap ratio of the two networks' predictions (paper, Fig. 7).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def _check_logits_and_labels(logits: torch.Tensor, labels: torch.Tensor, where: str) -> None:
    if logits.ndim != 4:
        raise ValueError(f"{where}: logits must be (B, C, H, W), got shape {tuple(logits.shape)}")
    expected = (logits.shape[0], *logits.shape[2:])
    if tuple(labels.shape) != expected:
        raise ValueError(
            f"{where}: labels must be (B, H, W) = {expected} to match the logits, got {tuple(labels.shape)}"
        )
    if labels.dtype.is_floating_point:
        raise ValueError(f"{where}: labels must be an integer tensor, got {labels.dtype}")


def cross_entropy(
    logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = 255, denominator: int | None = None
) -> torch.Tensor:
    """Pixel-wise cross-entropy, averaged over the pixels whose label is not `ignore_index`.

    Same value as `F.cross_entropy(..., ignore_index=...)`, except that a batch with no
    labelled pixel at all gives 0 (still attached to the graph) instead of NaN, so one fully
    padded crop cannot poison the weights of both networks.

    `denominator` replaces the count of labelled pixels: UniMatch's thresholded pseudo-label loss
    sums over the confident pixels and divides by all valid pixels (``Method.pseudo_denominator``).
    """
    _check_logits_and_labels(logits, labels, "cross_entropy")
    labels = labels.long()
    total = F.cross_entropy(logits.float(), labels, ignore_index=ignore_index, reduction="sum")
    if denominator is not None:
        return total / max(int(denominator), 1)
    num_labelled = (labels != ignore_index).sum().clamp(min=1)
    return total / num_labelled


class OhemCrossEntropy(nn.Module):
    """Cross-entropy on the hard pixels only: the original code's `ProbOhemCrossEntropy2d`.

    A labelled pixel is kept when the softmax probability of its ground-truth class is at most
    `max(threshold, p_k)`, where `p_k` is the `min_kept`-th smallest such probability in the
    batch; so at least `min_kept` pixels are always kept. The loss is the mean cross-entropy over
    the kept pixels. Two corner cases follow the original exactly:

    - fewer than `min_kept` labelled pixels in the batch: every labelled pixel is kept;
    - `min_kept == 0`: no pixel is dropped (the original only filters when `min_kept > 0`).

    The original ran it on each GPU's own batch of one Cityscapes image (global batch 8 on 8 GPUs),
    and DDP averaged the GPUs' gradients. `images_per_group` reproduces that on any number of
    devices: the batch is cut into groups of that many images, each group gets its own threshold,
    `min_kept` and mean, and the loss is the mean over groups. `images_per_group=0` treats the
    whole batch as one group.
    """

    def __init__(self, ignore_index: int = 255, threshold: float = 0.7, min_kept: int = 50000,
                 images_per_group: int = 1):
        super().__init__()
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"OhemCrossEntropy: threshold must be a probability in [0, 1], got {threshold}")
        if min_kept < 0:
            raise ValueError(f"OhemCrossEntropy: min_kept must be >= 0, got {min_kept}")
        if images_per_group < 0:
            raise ValueError(f"OhemCrossEntropy: images_per_group must be >= 0, got {images_per_group}")
        self.ignore_index = ignore_index
        self.threshold = float(threshold)
        self.min_kept = int(min_kept)
        self.images_per_group = int(images_per_group)

    @torch.no_grad()
    def hard_pixel_labels(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Labels with every easy (dropped) pixel set to `ignore_index`."""
        labelled = labels != self.ignore_index
        num_labelled = int(labelled.sum())
        if self.min_kept == 0 or num_labelled == 0 or self.min_kept > num_labelled:
            return labels
        safe_labels = labels.masked_fill(~labelled, 0)
        log_probs = F.log_softmax(logits.float(), dim=1)
        true_class_prob = log_probs.gather(1, safe_labels.unsqueeze(1)).squeeze(1).exp()
        # Unlabelled pixels get probability 1 so they sort last, as in the original.
        true_class_prob = true_class_prob.masked_fill(~labelled, 1.0)
        kth_smallest = true_class_prob.flatten().kthvalue(self.min_kept).values
        threshold = torch.clamp(kth_smallest, min=self.threshold)
        keep = labelled & (true_class_prob <= threshold)
        return labels.masked_fill(~keep, self.ignore_index)

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        _check_logits_and_labels(logits, labels, "OhemCrossEntropy")
        labels = labels.long()
        group = self.images_per_group or logits.shape[0]
        losses = [
            cross_entropy(group_logits, self.hard_pixel_labels(group_logits, group_labels), self.ignore_index)
            for group_logits, group_labels in zip(logits.split(group), labels.split(group))
        ]
        return losses[0] if len(losses) == 1 else torch.stack(losses).mean()


def pseudo_labels(logits: torch.Tensor) -> torch.Tensor:
    """One-hot pseudo segmentation map Y of equation 3, stored as class indices (argmax over C).

    Computed without gradient: CPS never back-propagates into the pseudo labels. The indices are
    those of `max(dim=1).indices` (= `argmax(dim=1)`, first maximum on ties); on CPU they come from
    `_first_max_index`, about 5x faster there (`max` over the channels was the largest cost of a CPS
    step on CPU outside the network passes and the optimizer).
    """
    with torch.no_grad():
        if logits.device.type == "cpu" and 0 < logits.shape[1] < 2**15:
            return _first_max_index(logits)
        return logits.max(dim=1).indices


def _first_max_index(logits: torch.Tensor) -> torch.Tensor:
    """`logits.max(dim=1).indices` through `amax`, which torch vectorises on CPU where the indexed
    reduction is not: every class equal to its pixel's maximum gets the weight C - c, so the largest
    weight names the first of them. A pixel holding NaN has no class equal to its maximum (largest
    weight 0); such maps go to `max` itself, so NaN is reported where it always was."""
    num_classes = logits.shape[1]
    weight_dtype = torch.uint8 if num_classes < 256 else torch.int16
    shape = (1, num_classes) + (1,) * (logits.dim() - 2)
    weights = torch.arange(num_classes, 0, -1, dtype=weight_dtype).view(shape)
    largest = ((logits == logits.amax(dim=1, keepdim=True)) * weights).amax(dim=1)
    if largest.numel() and not bool(largest.min()):
        return logits.max(dim=1).indices
    return num_classes - largest.long()


def cross_supervision(
    logits_1: torch.Tensor,
    logits_2: torch.Tensor,
    labels_from_1: torch.Tensor,
    labels_from_2: torch.Tensor,
    ignore_index: int = 255,
    denominator: int | None = None,
) -> torch.Tensor:
    """``CE(logits_1, labels_from_2) + CE(logits_2, labels_from_1)``: each network learns from the other.

    `cps_loss` calls it with the networks' own argmaxes; CPS+CutMix with the argmax of the mixed
    teacher logits. The labels must carry no gradient (pseudo labels are constants).
    `denominator` goes to both cross-entropies (see `cross_entropy`; None: the kept pixels).
    """
    if logits_1.shape != logits_2.shape:
        raise ValueError(
            f"cps loss: both networks' logits must have the same shape, got {tuple(logits_1.shape)} "
            f"and {tuple(logits_2.shape)}"
        )
    return (cross_entropy(logits_1, labels_from_2, ignore_index, denominator)
            + cross_entropy(logits_2, labels_from_1, ignore_index, denominator))


def cps_loss(logits_1: torch.Tensor, logits_2: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    r"""Cross pseudo supervision loss of equation 5 on one batch of images X:

    .. math::
        L_{cps} = \frac{1}{|X|} \sum_{X} \frac{1}{W H} \sum_{i=0}^{W H}
                  \big( \ell_{ce}(p_{1i}, y_{2i}) + \ell_{ce}(p_{2i}, y_{1i}) \big)

    with :math:`p_{ki} = \mathrm{softmax}(\text{logits}_k)_i` and :math:`y_{ki}` the one-hot
    vector of :math:`\arg\max_c p_{kic}` (no gradient flows through :math:`y`). In code:
    ``CE(logits_1, argmax logits_2) + CE(logits_2, argmax logits_1)``, each CE averaged over all
    pixels of the batch.

    Called on the unlabelled batch it is :math:`L^u_{cps}`, on the labelled batch
    :math:`L^l_{cps}` (the paper defines it "in the same way"). `ignore_index` is passed to the
    cross-entropy as in the original; argmax labels lie in [0, C), so no pixel is ignored unless
    C > ignore_index.
    """
    return cross_supervision(logits_1, logits_2, pseudo_labels(logits_1), pseudo_labels(logits_2), ignore_index)


def cross_probability_consistency(
    logits_1: torch.Tensor, logits_2: torch.Tensor, stop_gradient: bool = True
) -> torch.Tensor:
    r"""Cross probability consistency of equation 7 on one batch of images X:

    .. math::
        L_{cpc} = \frac{1}{|X|} \sum_{X} \frac{1}{W H} \sum_{i=0}^{W H}
                  \big( \ell_2(p_{1i}, p_{2i}) + \ell_2(p_{2i}, p_{1i}) \big),
        \qquad \ell_2(p, q) = \lVert p - q \rVert_2^2 ,

    with :math:`p_{ki} = \mathrm{softmax}(\text{logits}_k)_i` (computed in float32). The squared
    norm sums over the C classes and the mean runs over the pixels and images only, as written
    (``F.mse_loss`` would also divide by C).

    Gradients. Equation 7 is written, like equation 5, as two directed terms, "from" one network
    "to" the other: in :math:`\ell_2(p_{1i}, p_{2i})` network 1 is pulled towards network 2's
    probabilities, which act as the target. With ``stop_gradient=True`` (the default, used by the
    ``cpc`` method) each target is detached, so each network is trained only by the term in which
    it is the prediction: :math:`\partial L / \partial p_1 = 2 (p_1 - p_2)`, symmetric in the
    two networks. The two terms are then not redundant (they train different networks), as with
    CPS's two cross-entropies. With ``stop_gradient=False`` both terms back-propagate into both
    networks; the value is the same (:math:`2 \lVert p_1 - p_2 \rVert^2` in both forms) but every
    gradient is exactly twice as large, i.e. the same as the default with lambda doubled.
    """
    if logits_1.shape != logits_2.shape:
        raise ValueError(
            f"cpc loss: both networks' logits must have the same shape, got {tuple(logits_1.shape)} "
            f"and {tuple(logits_2.shape)}"
        )
    if logits_1.ndim != 4:
        raise ValueError(f"cpc loss: logits must be (B, C, H, W), got shape {tuple(logits_1.shape)}")
    p_1 = logits_1.float().softmax(dim=1)
    p_2 = logits_2.float().softmax(dim=1)
    target_1, target_2 = (p_1.detach(), p_2.detach()) if stop_gradient else (p_1, p_2)
    l2_12 = (p_1 - target_2).pow(2).sum(dim=1)  # l2(p_1i, p_2i): network 1 towards network 2
    l2_21 = (p_2 - target_1).pow(2).sum(dim=1)  # l2(p_2i, p_1i): network 2 towards network 1
    return (l2_12 + l2_21).mean()


def agreement_counts(
    predictions_1: torch.Tensor, predictions_2: torch.Tensor, ignore_mask: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(pixels where two (B, H, W) class maps agree, pixels counted), as tensors (no host sync)."""
    with torch.no_grad():
        agree = predictions_1 == predictions_2
        if ignore_mask is None:
            return agree.sum(), torch.tensor(agree.numel(), device=agree.device)
        if ignore_mask.shape != agree.shape:
            raise ValueError(
                f"prediction_agreement: ignore_mask must be (B, H, W) = {tuple(agree.shape)}, "
                f"got {tuple(ignore_mask.shape)}"
            )
        counted = ~ignore_mask.bool()
        return (agree & counted).sum(), counted.sum()


def prediction_agreement(
    logits_1: torch.Tensor, logits_2: torch.Tensor, ignore_mask: torch.Tensor | None = None
) -> float:
    """Fraction of pixels where the two networks predict the same class (paper, Figure 7).

    `ignore_mask` (B, H, W, True = leave out) restricts the count, e.g. to the object region as
    in Figure 7, which ignores background pixels. NaN when no pixel is counted.
    """
    agree, counted = agreement_counts(pseudo_labels(logits_1), pseudo_labels(logits_2), ignore_mask)
    counted = int(counted)
    return float(agree) / counted if counted else float("nan")
