"""Losses checked against hand-written formulas (equation 5, the original OHEM rule) and box masks."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cps_hf.cutmix import box_mask, mix
from cps_hf.losses import OhemCrossEntropy, cps_loss, cross_entropy, prediction_agreement, pseudo_labels


def _equation_5(logits_1, logits_2):
    """Eq. 5 for one batch, written out: one-hot Y from argmax, -sum_c y_c log p_c, averaged over W*H and images."""
    num_classes = logits_1.shape[1]
    log_p1 = torch.log_softmax(logits_1.double(), dim=1)
    log_p2 = torch.log_softmax(logits_2.double(), dim=1)
    y1 = F.one_hot(logits_1.argmax(1), num_classes).permute(0, 3, 1, 2).double()
    y2 = F.one_hot(logits_2.argmax(1), num_classes).permute(0, 3, 1, 2).double()
    per_image = []
    for b in range(logits_1.shape[0]):
        ce_1_from_2 = -(y2[b] * log_p1[b]).sum(0)  # l_ce(p_1i, y_2i) at every pixel i
        ce_2_from_1 = -(y1[b] * log_p2[b]).sum(0)
        per_image.append((ce_1_from_2 + ce_2_from_1).sum() / ce_1_from_2.numel())
    return torch.stack(per_image).mean()


def test_cps_loss_equals_equation_5():
    torch.manual_seed(0)
    logits_1, logits_2 = torch.randn(3, 5, 7, 6), torch.randn(3, 5, 7, 6)
    assert torch.allclose(cps_loss(logits_1, logits_2).double(), _equation_5(logits_1, logits_2), atol=1e-5)


def test_cps_loss_gradient_does_not_flow_into_pseudo_labels():
    torch.manual_seed(1)
    logits_1 = torch.randn(2, 4, 5, 5, requires_grad=True)
    logits_2 = torch.randn(2, 4, 5, 5, requires_grad=True)
    cps_loss(logits_1, logits_2).backward()
    # With the targets treated as constants, d/dz CE(z, y) = (softmax(z) - onehot(y)) / N.
    n = 2 * 5 * 5
    for student, teacher, grad in ((logits_1, logits_2, logits_1.grad), (logits_2, logits_1, logits_2.grad)):
        onehot = F.one_hot(teacher.detach().argmax(1), 4).permute(0, 3, 1, 2).float()
        expected = (torch.softmax(student.detach(), 1) - onehot) / n
        assert torch.allclose(grad, expected, atol=1e-6)


def test_pseudo_labels_equal_argmax_including_ties():
    logits = torch.randint(0, 3, (2, 6, 5, 5)).float()  # many ties
    assert torch.equal(pseudo_labels(logits), logits.argmax(1))
    assert not pseudo_labels(logits.requires_grad_()).requires_grad


@pytest.mark.parametrize("num_classes", [1, 2, 21, 300])
def test_pseudo_labels_are_the_indices_of_max_for_every_value(num_classes):
    """The CPU path (amax and weights) gives exactly max(dim=1).indices: ties, infinities, signed
    zeros, NaN (reported by max itself), low precision, any memory layout."""
    g = torch.Generator().manual_seed(num_classes)
    logits = torch.randint(-2, 3, (3, num_classes, 6, 7), generator=g).float()  # many ties
    logits[0, -1, 0, 0] = float("inf")
    logits[1, :, 1, 1] = float("-inf")
    logits[1, :, 2, 2] = 0.0
    logits[1, 0, 2, 2] = -0.0
    views = [logits, logits.to(torch.bfloat16), logits.to(memory_format=torch.channels_last),
             logits[:, :, ::2], torch.randn(2, num_classes, 5, 4, generator=g)]
    with_nan = logits.clone()
    with_nan[2, num_classes // 2, 3, 3] = float("nan")
    for tensor in [*views, with_nan]:
        result = pseudo_labels(tensor)
        assert result.dtype == torch.int64 and torch.equal(result, tensor.max(dim=1).indices)


def test_cps_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same shape"):
        cps_loss(torch.randn(1, 3, 4, 4), torch.randn(1, 3, 4, 5))


def test_cross_entropy_ignores_255_and_never_returns_nan():
    torch.manual_seed(3)
    logits = torch.randn(2, 4, 3, 3, requires_grad=True)
    labels = torch.randint(0, 4, (2, 3, 3))
    labels[0, 0] = 255
    expected = F.cross_entropy(logits, labels, ignore_index=255)
    assert torch.allclose(cross_entropy(logits, labels), expected)
    empty = cross_entropy(logits, torch.full((2, 3, 3), 255))
    assert empty.item() == 0.0 and empty.requires_grad


def test_cross_entropy_names_shape_errors():
    with pytest.raises(ValueError, match="labels must be"):
        cross_entropy(torch.randn(2, 4, 3, 3), torch.zeros(2, 4, 4, dtype=torch.long))


def _ohem_numpy(logits, labels, ignore, thresh, min_kept):
    """The original's rule written directly in numpy."""
    logits = logits.astype(np.float64)
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    flat_labels = labels.reshape(-1).copy()
    valid = flat_labels != ignore
    num_classes = logits.shape[1]
    flat_probs = probs.transpose(1, 0, 2, 3).reshape(num_classes, -1)
    keep = valid.copy()
    if 0 < min_kept <= valid.sum():
        true_prob = np.where(valid, flat_probs[np.where(valid, flat_labels, 0), np.arange(flat_labels.size)], 1.0)
        kth = np.sort(true_prob)[min_kept - 1]
        keep = valid & (true_prob <= max(thresh, kth))
    log_probs = np.log(flat_probs)
    chosen = log_probs[np.where(keep, flat_labels, 0), np.arange(flat_labels.size)]
    return -(chosen[keep]).sum() / max(keep.sum(), 1), keep.sum()


@pytest.mark.parametrize("min_kept", [0, 10, 40, 10_000])
def test_ohem_matches_direct_numpy_implementation(min_kept):
    rng = np.random.default_rng(min_kept)
    logits = rng.normal(size=(2, 5, 8, 8)).astype(np.float32) * 3
    labels = rng.integers(0, 5, size=(2, 8, 8))
    labels[0, :2] = 255
    expected, kept = _ohem_numpy(logits, labels, 255, 0.7, min_kept)
    criterion = OhemCrossEntropy(ignore_index=255, threshold=0.7, min_kept=min_kept, images_per_group=0)
    got = criterion(torch.from_numpy(logits), torch.from_numpy(labels))
    assert got.item() == pytest.approx(expected, rel=1e-5)
    hard = criterion.hard_pixel_labels(torch.from_numpy(logits), torch.from_numpy(labels))
    assert int((hard != 255).sum()) == kept
    if min_kept == 40:  # the min_kept floor is active: more than just the below-threshold pixels
        assert kept >= 40


@pytest.mark.parametrize("images_per_group", [1, 2])
def test_ohem_per_group_is_the_mean_of_separate_devices(images_per_group):
    """The original ran OHEM on each GPU's own image and DDP averaged: a batch of 4 in groups of
    `images_per_group` gives the mean of the groups' separate OHEM losses."""
    rng = np.random.default_rng(images_per_group)
    logits = rng.normal(size=(4, 5, 8, 8)).astype(np.float32) * 3
    labels = rng.integers(0, 5, size=(4, 8, 8))
    labels[1, :3] = 255
    groups = [slice(i, i + images_per_group) for i in range(0, 4, images_per_group)]
    expected = np.mean([_ohem_numpy(logits[g], labels[g], 255, 0.7, 40)[0] for g in groups])
    got = OhemCrossEntropy(threshold=0.7, min_kept=40, images_per_group=images_per_group)(
        torch.from_numpy(logits), torch.from_numpy(labels))
    assert got.item() == pytest.approx(expected, rel=1e-5)
    whole = OhemCrossEntropy(threshold=0.7, min_kept=40, images_per_group=0)(
        torch.from_numpy(logits), torch.from_numpy(labels))
    assert whole.item() != pytest.approx(got.item(), rel=1e-3)  # grouping really changes the loss


def test_ohem_keeps_only_hard_pixels_when_enough_are_hard():
    logits = torch.zeros(1, 2, 1, 4)
    logits[0, 0] = torch.tensor([5.0, 5.0, -5.0, -5.0])  # class-0 prob ~1, ~1, ~0, ~0
    labels = torch.zeros(1, 1, 4, dtype=torch.long)
    hard = OhemCrossEntropy(threshold=0.7, min_kept=1).hard_pixel_labels(logits, labels)
    assert hard.tolist() == [[[255, 255, 0, 0]]]


def test_prediction_agreement_counts_argmax_matches():
    a = torch.zeros(1, 3, 1, 4)
    b = torch.zeros(1, 3, 1, 4)
    a[0, :, 0] = torch.tensor([[1, 0, 0, 1], [0, 1, 0, 0], [0, 0, 1, 0]]).float()  # argmax 0 1 2 0
    b[0, :, 0] = torch.tensor([[1, 0, 1, 0], [0, 1, 0, 1], [0, 0, 0, 0]]).float()  # argmax 0 1 0 1
    assert prediction_agreement(a, b) == pytest.approx(0.5)
    ignore = torch.tensor([[[True, False, False, False]]])
    assert prediction_agreement(a, b, ignore) == pytest.approx(1 / 3)


# --- CutMix box masks ---------------------------------------------------------------------


def _box_masks_numpy(rng, n, height, width, low=0.25, high=0.5, n_boxes=3):
    """The original generator's algorithm, written with numpy's RNG and explicit loops."""
    props = rng.uniform(low, high, (n, n_boxes))
    y_props = np.exp(rng.uniform(0, 1, (n, n_boxes)) * np.log(props))
    x_props = props / y_props
    y_props, x_props = y_props * np.sqrt(1 / n_boxes), x_props * np.sqrt(1 / n_boxes)
    sizes = np.round(np.stack([y_props, x_props], 2) * np.array([height, width]))
    corners = np.round((np.array([height, width]) - sizes) * rng.uniform(0, 1, sizes.shape))
    masks = np.zeros((n, 1, height, width))
    for i in range(n):
        for (y0, x0), (h, w) in zip(corners[i].astype(int), sizes[i].astype(int)):
            masks[i, 0, y0 : y0 + h, x0 : x0 + w] = 1 - masks[i, 0, y0 : y0 + h, x0 : x0 + w]
    return masks


def test_box_mask_area_matches_the_original_algorithm():
    masks = box_mask(2000, 64, 64, generator=torch.Generator().manual_seed(0))
    assert masks.shape == (2000, 1, 64, 64) and masks.dtype == torch.float32
    assert set(masks.unique().tolist()) <= {0.0, 1.0}
    area = masks.mean(dim=(1, 2, 3)).numpy()
    reference = _box_masks_numpy(np.random.default_rng(0), 2000, 64, 64).mean(axis=(1, 2, 3))
    # Three boxes of p/3 each, p in [0.25, 0.5]: at most 1/2 of the image (+ rounding); XOR removes overlaps.
    assert 0.0 < area.min() and area.max() <= 0.5 + 0.03
    assert abs(area.mean() - reference.mean()) < 0.01  # ~0.25; a union instead of XOR gives ~0.31
    assert abs(area.std() - reference.std()) < 0.01


def test_box_mask_single_box_area_in_prop_range():
    masks = box_mask(100, 64, 64, generator=torch.Generator().manual_seed(1), n_boxes=1)
    area = masks.mean(dim=(1, 2, 3))
    assert area.min() >= 0.25 - 0.03 and area.max() <= 0.5 + 0.03


def test_box_mask_boxes_toggle_where_they_overlap():
    # On a 1x1 image every box covers the one pixel: an even number of boxes cancels out (XOR),
    # an odd number leaves it set; a union would set it in both cases.
    kwargs = dict(generator=torch.Generator().manual_seed(0), prop_range=(1.0, 1.0), random_aspect_ratio=False)
    assert box_mask(4, 1, 1, n_boxes=2, **kwargs).eq(0).all()
    assert box_mask(4, 1, 1, n_boxes=3, **kwargs).eq(1).all()
    # Two boxes of 1/4 of the image each: the XOR area 1/2 - 2 * overlap is below 1/2 when they overlap.
    g = torch.Generator().manual_seed(5)
    masks = box_mask(500, 32, 32, generator=g, prop_range=(0.5, 0.5), n_boxes=2, random_aspect_ratio=False)
    area = masks.mean(dim=(1, 2, 3))
    assert area.max() <= 0.5 + 1e-6 and area.min() < 0.5


def test_box_mask_invert_gives_complement_and_generator_determinism():
    a = box_mask(3, 20, 24, generator=torch.Generator().manual_seed(7))
    b = box_mask(3, 20, 24, generator=torch.Generator().manual_seed(7), invert=False)
    c = box_mask(3, 20, 24, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, 1 - b)
    assert torch.equal(a, box_mask(3, 20, 24, generator=torch.Generator().manual_seed(7)))
    assert not torch.equal(a, c)


def test_mix_takes_second_image_inside_mask():
    a, b = torch.zeros(2, 3, 4, 4), torch.ones(2, 3, 4, 4)
    mask = torch.zeros(2, 1, 4, 4)
    mask[:, :, :2] = 1
    mixed = mix(a, b, mask)
    assert mixed[:, :, :2].eq(1).all() and mixed[:, :, 2:].eq(0).all()
