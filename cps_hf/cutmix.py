"""Box-mask CutMix as used by CPS+CutMix (the original's `BoxMaskGenerator` settings).

A mask M is 1 where the second image is pasted: ``mixed = a * (1 - M) + b * M``. The same M
mixes the images the students see and the teachers' logits that become pseudo labels.
"""

from __future__ import annotations

import math

import torch


def box_mask(
    batch_size: int,
    height: int,
    width: int,
    generator: torch.Generator | None = None,
    prop_range: tuple[float, float] = (0.25, 0.5),
    n_boxes: int = 3,
    random_aspect_ratio: bool = True,
    invert: bool = True,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """One random box mask per sample, shape (B, 1, H, W), float 0/1.

    Follows the original generator (proportions by area, boxes within the image):

    - each of the `n_boxes` boxes draws its own area proportion p ~ U(prop_range) and covers
      p / n_boxes of the image;
    - with `random_aspect_ratio` its height fraction is sqrt(1/n) * exp(u * ln p), u ~ U(0, 1),
      and its width fraction sqrt(1/n) * p / exp(u * ln p); otherwise both are sqrt(p / n);
    - sizes are rounded to pixels, the top-left corner is uniform over the positions that keep
      the box inside the image (rounded);
    - boxes toggle (XOR) where they overlap. With `invert=True` (the original's setting) the
      mask starts at 0, so it is 1 on the boxes; `invert=False` gives the complement.

    So with the defaults, M covers at most 50% of the image (less where boxes overlap).
    Parameters are drawn on the CPU from `generator` (reproducible), the mask is built on
    `device` with one broadcasted comparison.
    """
    low, high = prop_range
    if not 0.0 < low <= high <= 1.0:
        raise ValueError(f"box_mask: prop_range must satisfy 0 < low <= high <= 1, got {prop_range}")
    if n_boxes < 1:
        raise ValueError(f"box_mask: n_boxes must be >= 1, got {n_boxes}")
    shape = (batch_size, n_boxes)
    proportions = low + (high - low) * torch.rand(shape, generator=generator, dtype=torch.float64)
    if random_aspect_ratio:
        height_frac = torch.exp(torch.rand(shape, generator=generator, dtype=torch.float64) * proportions.log())
        width_frac = proportions / height_frac
    else:
        height_frac = width_frac = proportions.sqrt()
    scale = math.sqrt(1.0 / n_boxes)
    box_h = torch.round(height_frac * scale * height)
    box_w = torch.round(width_frac * scale * width)
    top = torch.round((height - box_h) * torch.rand(shape, generator=generator, dtype=torch.float64))
    left = torch.round((width - box_w) * torch.rand(shape, generator=generator, dtype=torch.float64))

    boxes = torch.stack([top, top + box_h, left, left + box_w], dim=-1).long().to(device)
    rows = torch.arange(height, device=device).view(1, 1, height, 1)
    cols = torch.arange(width, device=device).view(1, 1, 1, width)
    y0, y1, x0, x1 = (boxes[..., k, None, None] for k in range(4))  # (B, n_boxes, 1, 1)
    inside = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)  # (B, n_boxes, H, W)
    toggled = inside.sum(dim=1, keepdim=True) % 2 == 1  # XOR over the boxes
    mask = toggled if invert else ~toggled
    return mask.float()


def mix(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`a` outside the mask, `b` inside: ``a * (1 - mask) + b * mask`` (mask broadcasts over C)."""
    return a * (1 - mask) + b * mask
