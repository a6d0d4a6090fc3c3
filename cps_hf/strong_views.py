"""Strong views of unlabeled images for the weak-to-strong methods (FixMatch, UniMatch, CPS across views).

A strong view keeps the weak view's geometry (same crop, scale and flip, so pixel i is the same pixel)
and perturbs its photometry as UniMatch's `dataset/semi.py` does, per image:

- colour jitter (brightness, contrast, saturation 0.5, hue 0.25, in a random order) with p 0.8;
- grayscale with p 0.2;
- Gaussian blur, sigma ~ U(0.1, 2.0), with p 0.5;
- a CutMix box (p 0.5, area 0.02-0.4 of the crop, aspect ratio 0.3-3.3) that the method fills from
  another image's strong view (`cutmix_boxes`).

The ops are torchvision's (`transforms.v2.functional`), run on the step's device on the normalised
batch (de-normalised to [0, 1] first, normalised again after), with every random draw taken from the
method's per-call generator, so a view depends on (seed, step, rank, micro-step) only and a resumed
run draws the same views. Differences to UniMatch, which works on PIL images in its data workers:
the blur kernel is torchvision's (2 * ceil(3 sigma) + 1 taps) where PIL approximates the Gaussian
with box blurs, values stay float (PIL rounds to 8 bits after each op), and a crop's padding is this
trainer's mean colour, which the strong view perturbs like the image.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torchvision.transforms.v2 import functional as TF


@dataclass(frozen=True)
class StrongViewSettings:
    """UniMatch's strong augmentation (its values are the defaults); each is a trainer flag."""

    color_jitter: tuple[float, float, float, float] = (0.5, 0.5, 0.5, 0.25)  # brightness, contrast, saturation, hue
    color_jitter_p: float = 0.8
    grayscale_p: float = 0.2
    blur_p: float = 0.5
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    cutmix_p: float = 0.5
    cutmix_area: tuple[float, float] = (0.02, 0.4)
    cutmix_ratio: tuple[float, float] = (0.3, 1 / 0.3)

    def __post_init__(self):
        for name in ("color_jitter_p", "grayscale_p", "blur_p", "cutmix_p"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"strong views: {name} must be a probability, got {getattr(self, name)}")
        brightness, contrast, saturation, hue = self.color_jitter
        if min(brightness, contrast, saturation) < 0 or not 0 <= hue <= 0.5:
            raise ValueError(f"strong views: color_jitter needs brightness, contrast, saturation >= 0 and hue in "
                             f"[0, 0.5], got {list(self.color_jitter)}")
        low, high = self.blur_sigma
        if not 0 < low <= high:
            raise ValueError(f"strong views: blur_sigma needs 0 < low <= high, got {list(self.blur_sigma)}")
        low, high = self.cutmix_area
        if not 0 < low <= high <= 1:
            raise ValueError(f"strong views: cutmix_area needs 0 < low <= high <= 1, got {list(self.cutmix_area)}")


def _uniform(generator: torch.Generator, low: float, high: float) -> float:
    return low + (high - low) * float(torch.rand((), generator=generator, dtype=torch.float64))


def _chance(generator: torch.Generator, p: float) -> bool:
    return float(torch.rand((), generator=generator, dtype=torch.float64)) < p


def _jitter(image: torch.Tensor, settings: StrongViewSettings, generator: torch.Generator) -> torch.Tensor:
    """torchvision's ColorJitter on one [0, 1] image: factors around 1 (hue around 0), a random order."""
    brightness, contrast, saturation, hue = settings.color_jitter
    factors = [_uniform(generator, max(0.0, 1 - brightness), 1 + brightness),
               _uniform(generator, max(0.0, 1 - contrast), 1 + contrast),
               _uniform(generator, max(0.0, 1 - saturation), 1 + saturation),
               _uniform(generator, -hue, hue)]
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    for index in torch.randperm(4, generator=generator).tolist():
        image = ops[index](image, factors[index])
    return image


def strong_view(pixel_values: torch.Tensor, mean, std, generator: torch.Generator,
                settings: StrongViewSettings = StrongViewSettings()) -> torch.Tensor:
    """A strong view of a normalised batch (B, 3, H, W): each image jittered, greyed and blurred with its
    own draws (see the module docstring), returned normalised with `mean` / `std` again."""
    mean_t = torch.as_tensor(mean, dtype=pixel_values.dtype, device=pixel_values.device).view(3, 1, 1)
    std_t = torch.as_tensor(std, dtype=pixel_values.dtype, device=pixel_values.device).view(3, 1, 1)
    views = []
    for image in pixel_values:
        image = (image * std_t + mean_t).clamp(0, 1)
        if _chance(generator, settings.color_jitter_p):
            image = _jitter(image, settings, generator)
        if _chance(generator, settings.grayscale_p):
            image = TF.rgb_to_grayscale(image, num_output_channels=3)
        if _chance(generator, settings.blur_p):
            sigma = _uniform(generator, *settings.blur_sigma)
            size = 2 * math.ceil(3 * sigma) + 1
            image = TF.gaussian_blur(image, [size, size], [sigma, sigma])
        views.append((image - mean_t) / std_t)
    return torch.stack(views)


def cutmix_boxes(batch_size: int, height: int, width: int, generator: torch.Generator,
                 settings: StrongViewSettings = StrongViewSettings(), device=None) -> torch.Tensor:
    """(B, H, W) bool: per image, with p `cutmix_p`, one box of area U(cutmix_area) x H x W and aspect ratio
    U(cutmix_ratio), placed uniformly where it fits (UniMatch's `obtain_cutmix_box`, for any H x W)."""
    boxes = torch.zeros(batch_size, height, width, dtype=torch.bool)
    for index in range(batch_size):
        if not _chance(generator, settings.cutmix_p):
            continue
        size = _uniform(generator, *settings.cutmix_area) * height * width
        for _ in range(1000):  # UniMatch redraws until the box fits
            ratio = _uniform(generator, *settings.cutmix_ratio)
            box_w, box_h = int(math.sqrt(size / ratio)), int(math.sqrt(size * ratio))
            x = int(torch.randint(0, width, (), generator=generator))
            y = int(torch.randint(0, height, (), generator=generator))
            if x + box_w <= width and y + box_h <= height:
                boxes[index, y:y + box_h, x:x + box_w] = True
                break
    return boxes.to(device) if device is not None else boxes
