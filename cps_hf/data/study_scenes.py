"""Synthetic VOC-layout scenes for the method study (benchmarks/ssl_study.py): harder than the demo.

What a scene holds
------------------
Eight object classes plus background. A class is a *colour family* in a *tone*, and neither cue
alone names it:

    colours: red (hue 0), lime (90), cyan (180), violet (270)
    tones:   light (pastel: saturation 0.3-0.5, value 0.82-1) and dark (deep: saturation 0.65-1,
             value 0.35-0.55)
    class k = 1 + 2 * colour + tone, named "<tone>_<colour>" (e.g. "dark_cyan")

Textures (plain, stripes, dots, checks) and outlines (disc, box, triangle, jagged blob) are drawn
at random for every object, distractor and background: they are nuisance, not class.

Appearance modes. Each class comes in three modes of unequal frequency (`MODE_WEIGHTS`):

- typical (60 %): the family's hue +-12 degrees;
- shifted (30 %): hue moved 18-40 degrees towards the next family;
- shaded (10 %): typical hue, value scaled by 0.55-0.85 (continuously darker), so a shaded light
  object drifts towards the dark tone and a shaded dark one towards black.

Class imbalance. Objects draw their class from `CLASS_WEIGHTS` (10 : 1 between the most and the
least frequent), so the rarest classes (light_lime, dark_violet) cover about 3 % of the objects.

Clutter. Backgrounds are grey-ish gradients carrying the same textures in grey. Up to two
distractors per scene are labelled background: grey objects, and saturated objects in the hues
between the families (55-68 degrees past a family centre, 15 degrees from its shifted mode and 10
from the next family's typical one). Two to four objects per scene occlude each other and the
distractors and may be cut by the image border; a global illumination factor (0.85-1.15) and
pixel noise come last.

Why it is hard, and why unlabeled images help
---------------------------------------------
With 1/16 of an 800-image pool labeled (50 images, about 150 objects) a rare class has a handful
of labeled examples or none, and rare modes of most classes are missing (a shaded rare class:
about 0.5 expected objects). A network trained on those labels learns the typical modes and
confuses the rest: shifted hues with the distractors (background) or the next family, shaded
light objects with the dark tone. The unlabeled images hold every class in every mode, and each
mode joins its typical one continuously (hue runs from typical to shifted, value from typical to
shaded) with a low-density gap before the distractor hues, so pseudo labels that are right on the
typical side can spread across the rest: the cluster assumption semi-supervised methods rely on.
A class with no labeled object at all cannot be learnt by any method. Whether a method exploits
the unlabeled images, or reinforces its early mistakes (as CPS does when a class is nearly
absent from the labels), is what the study measures.

Why colour and tone, not shape or texture: classes defined by outline x material ("stripes_disc")
reached 27 % mIoU with all 800 labels after 300 steps of a random-init ResNet-18 (18 % for
MobileNetV3-small after 400), and colour x texture ("red_stripes") 43 % for the study's network
after 1500 steps: both learnt the colour and never the second cue. The study's budget (a few
hundred steps of a tiny network per run, 63 runs in about two hours on two CPU cores) needs cues a
network from scratch learns in that time; with colour x tone the study network reaches ~82 % with
all labels and ~69 % with 1/16 in 400 steps (seed 0).

Determinism
-----------
Image i of a split drawn with seed s comes from `numpy.random.default_rng([s, i])` alone, so a
tree is byte-identical for the same arguments, any image can be regenerated on its own, and a
different seed gives different scenes: the study's held-out validation set is the same generator
with `val_seed` (default: train seed + 1000). The tree also records, per image, each object's
class, mode and visible pixel count (`scenes.json`) and the generator's arguments
(`generator.json`). classes.json carries a palette that looks like the classes.
"""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np

from .classes import IGNORE_INDEX, voc_palette
from .demo import hsv_to_rgb, write_voc_image_sets, write_voc_sample

COLOURS = ("red", "lime", "cyan", "violet")
TONES = ("light", "dark")
TEXTURES = ("plain", "stripes", "dots", "checks")  # nuisance: any object, distractor or background wears any
OUTLINES = ("disc", "box", "triangle", "jagged")
MODES = ("typical", "shifted", "shaded")
MODE_WEIGHTS = (0.6, 0.3, 0.1)
STUDY_CLASSES = ["background"] + [f"{tone}_{colour}" for colour in COLOURS for tone in TONES]
# Relative frequency of each object class (index 1..8), 10 : 1 between the most and least frequent.
CLASS_WEIGHTS = (
    10.0, 5.0,  # red: light, dark
    1.2, 7.0,  # lime
    6.0, 2.0,  # cyan
    4.0, 1.0,  # violet
)
_HUE_CENTRES = (0.0, 90.0, 180.0, 270.0)  # degrees, one family per colour
_DISTRACTOR_OFFSET = (55.0, 68.0)  # distractor hues: this far past a family centre, between its modes and the next's
GENERATOR_VERSION = 4  # bump when a change alters the written files, so stale trees are regenerated


def class_index(colour: int, tone: int) -> int:
    return 1 + len(TONES) * colour + tone


def _texture(rng: np.random.Generator, kind: str, height: int, width: int, period: float) -> np.ndarray:
    """A texture in [0, 1] of the given kind at a random angle and phase."""
    yy, xx = np.mgrid[:height, :width].astype(np.float32)
    theta = rng.uniform(0, np.pi)
    u = xx * np.cos(theta) + yy * np.sin(theta) + rng.uniform(0, period)
    v = -xx * np.sin(theta) + yy * np.cos(theta) + rng.uniform(0, period)
    if kind == "stripes":
        return ((u / period) % 1.0 < 0.5).astype(np.float32)
    if kind == "checks":
        return (((np.floor(u / period) + np.floor(v / period)) % 2) == 0).astype(np.float32)
    if kind == "dots":
        du, dv = (u / period) % 1.0 - 0.5, (v / period) % 1.0 - 0.5
        return (du * du + dv * dv < 0.07).astype(np.float32)
    if kind == "noise":
        coarse = rng.uniform(0, 1, size=(max(2, int(height / period)), max(2, int(width / period)), 1))
        return cv2.resize(coarse.astype(np.float32), (width, height), interpolation=cv2.INTER_LINEAR)
    if kind == "plain":  # no pattern, only a gentle shading ramp
        return (u - u.mean()) / max(float(np.ptp(u)), 1.0) * 0.6 + 0.5
    raise ValueError(f"unknown texture {kind!r}")


def _mode_look(rng: np.random.Generator, colour: int, tone: int, mode: int) -> tuple[float, float, float, float, float]:
    """(hue, saturation, value, texture period, texture contrast) of class (colour, tone) in `mode`."""
    centre = _HUE_CENTRES[colour]
    hue = centre + (rng.uniform(18, 40) if mode == 1 else rng.uniform(-12, 12))
    if TONES[tone] == "light":  # pastel
        saturation, value = rng.uniform(0.3, 0.5), rng.uniform(0.82, 1.0)
    else:  # deep
        saturation, value = rng.uniform(0.65, 1.0), rng.uniform(0.35, 0.55)
    if mode == 2:  # shaded: darker, continuously from the typical look
        value *= rng.uniform(0.55, 0.85)
    return hue, saturation, value, rng.uniform(4, 11), rng.uniform(0.08, 0.25)


def _fill(rng: np.random.Generator, kind: str, look, height: int, width: int) -> np.ndarray:
    """An (H, W, 3) float RGB fill: texture `kind` modulating the value of the (h, s, v) look."""
    hue, saturation, value, period, contrast = look
    texture = _texture(rng, kind, height, width, period)
    v_map = np.clip(value + contrast * (texture - 0.5), 0.05, 1.0)
    return hsv_to_rgb(np.full((height, width), hue), np.full((height, width), saturation), v_map)


def _outline(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A disc, box, triangle or jagged blob of random size, aspect, angle and place (may leave the image)."""
    mask = np.zeros((height, width), dtype=np.uint8)
    radius = rng.uniform(0.14, 0.3) * min(height, width)
    cx, cy = rng.uniform(0.1, 0.9) * width, rng.uniform(0.1, 0.9) * height
    angle = rng.uniform(0, 360)
    kind = OUTLINES[int(rng.integers(0, len(OUTLINES)))]
    if kind == "disc":
        axes = (max(2, round(radius)), max(2, round(radius * rng.uniform(0.65, 1.0))))
        cv2.ellipse(mask, (round(cx), round(cy)), axes, angle, 0, 360, 1, -1)
        return mask.astype(bool)
    if kind == "box":
        corners = cv2.boxPoints(((cx, cy), (2 * radius * rng.uniform(0.8, 1.0), 2 * radius * rng.uniform(0.5, 0.9)),
                                 angle))
    elif kind == "triangle":
        angles = np.deg2rad(angle + np.arange(3) * 120.0 + rng.uniform(-15, 15, 3))
        radii = radius * rng.uniform(0.95, 1.2, 3)
        corners = np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], 1)
    else:  # jagged: alternating long and short spokes
        count = int(rng.integers(7, 11))
        angles = np.sort(rng.uniform(0, 2 * np.pi, count))
        radii = radius * np.where(np.arange(count) % 2 == 0, rng.uniform(0.9, 1.2, count), rng.uniform(0.4, 0.7, count))
        corners = np.stack([cx + radii * np.cos(angles), cy + radii * np.sin(angles)], 1)
    cv2.fillPoly(mask, [np.round(corners).astype(np.int32)], 1)
    return mask.astype(bool)


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Grey-ish gradient plus a grey texture of one of the object kinds (or smooth noise)."""
    corners = rng.uniform(50, 210, size=(3, 3, 1)).astype(np.float32)
    tint = rng.uniform(-15, 15, size=(1, 1, 3)).astype(np.float32)
    image = cv2.resize(corners, (width, height), interpolation=cv2.INTER_LINEAR)[..., None] + tint
    kind = ("stripes", "dots", "checks", "noise")[int(rng.integers(0, 4))]
    texture = _texture(rng, kind, height, width, rng.uniform(4, 12))
    return image + (texture[..., None] - 0.5) * rng.uniform(10, 50)


def _distractor(rng: np.random.Generator, image: np.ndarray) -> None:
    """Background clutter, plain or striped: a grey object, or a saturated one in a hue between the families."""
    height, width = image.shape[:2]
    mask = _outline(rng, height, width)
    if rng.random() < 0.5:
        look = (rng.uniform(0, 360), rng.uniform(0.0, 0.12), rng.uniform(0.3, 0.9), rng.uniform(4, 11),
                rng.uniform(0.08, 0.25))
    else:
        hue = _HUE_CENTRES[int(rng.integers(0, len(COLOURS)))] + rng.uniform(*_DISTRACTOR_OFFSET)
        look = (hue, rng.uniform(0.3, 1.0), rng.uniform(0.35, 1.0), rng.uniform(4, 11), rng.uniform(0.08, 0.25))
    image[mask] = _fill(rng, TEXTURES[int(rng.integers(0, len(TEXTURES)))], look, height, width)[mask]


def make_study_scene(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    """One (RGB uint8 image, class-index label, objects) triple; later objects occlude earlier ones.

    `objects` lists each drawn object's class, colour, texture, mode and visible pixel count."""
    image = _background(rng, height, width)
    label = np.zeros((height, width), dtype=np.uint8)
    for _ in range(int(rng.integers(0, 3))):
        _distractor(rng, image)
    weights = np.asarray(CLASS_WEIGHTS) / sum(CLASS_WEIGHTS)
    drawn = []
    for _ in range(int(rng.integers(2, 5))):
        colour, tone = divmod(int(rng.choice(len(CLASS_WEIGHTS), p=weights)), len(TONES))
        mode = int(rng.choice(3, p=MODE_WEIGHTS))
        mask = _outline(rng, height, width)
        texture = TEXTURES[int(rng.integers(0, len(TEXTURES)))]
        fill = _fill(rng, texture, _mode_look(rng, colour, tone, mode), height, width)
        image[mask] = fill[mask]
        label[mask] = class_index(colour, tone)
        drawn.append((class_index(colour, tone), mode, mask))
    objects = []
    for position, (cls, mode, mask) in enumerate(drawn):
        visible = mask.copy()
        for *_, later in drawn[position + 1:]:
            visible &= ~later
        objects.append({"class": STUDY_CLASSES[cls], "mode": MODES[mode], "visible_pixels": int(visible.sum())})
    image = image * rng.uniform(0.85, 1.15) + rng.normal(0, 3, size=image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), label, objects


def make_split(seed: int, count: int, size: tuple[int, int] = (64, 96)):
    """Yield (index, image, label, objects) for images 0..count-1 of seed `seed`."""
    low, high = size
    for index in range(count):
        rng = np.random.default_rng([seed, index])
        height, width = (int(v) for v in rng.integers(low, high + 1, size=2))
        yield (index, *make_study_scene(rng, height, width))


def make_study_voc(
    root: str | Path,
    num_train: int = 800,
    num_val: int = 200,
    size: tuple[int, int] | int = (64, 96),
    seed: int = 0,
    val_seed: int | None = None,
) -> Path:
    """Write the study's VOC-layout tree under `root`/VOCdevkit/VOC2012 and return that folder.

    Train images come from `seed`, validation images from `val_seed` (default `seed + 1000`): the
    same generator, other scenes. Layout as `make_demo_voc` (JPEGImages, SegmentationClass with
    255 borders, SegmentationClassAug, ImageSets, classes.json) plus scenes.json (objects per
    image) and generator.json (these arguments). Image sides are drawn from `size` (low, high).
    """
    low, high = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if num_train < 1 or num_val < 1 or low < 8 or low > high:
        raise ValueError(f"need num_train, num_val >= 1 and 8 <= size low <= high; got {num_train}, {num_val}, {size}")
    val_seed = seed + 1000 if val_seed is None else val_seed
    if val_seed == seed:
        raise ValueError("val_seed must differ from seed: the validation scenes would repeat the training ones")
    voc = Path(root) / "VOCdevkit" / "VOC2012"
    folders = {name: voc / name for name in ("JPEGImages", "SegmentationClass", "SegmentationClassAug")}
    for folder in list(folders.values()) + [voc / "ImageSets" / "Segmentation", voc / "ImageSets" / "SegmentationAug"]:
        folder.mkdir(parents=True, exist_ok=True)
    palette = study_palette()
    palette += voc_palette()[len(palette):]  # the rest, 255 (ignore) included, as VOC
    ids, scenes = {"train": [], "val": []}, {"train": {}, "val": {}}
    for split, split_seed, count in (("train", seed, num_train), ("val", val_seed, num_val)):
        for index, image, label, objects in make_split(split_seed, count, (low, high)):
            sample_id = f"{split}_s{split_seed}_{index:05d}"
            ids[split].append(sample_id)
            scenes[split][sample_id] = objects
            write_voc_sample(folders, sample_id, image, label, palette)
    write_voc_image_sets(voc, ids)
    classes = {"classes": STUDY_CLASSES, "ignore_index": IGNORE_INDEX, "palette": study_palette()}
    (voc / "classes.json").write_text(json.dumps(classes, indent=1) + "\n")
    (voc / "scenes.json").write_text(json.dumps(scenes, indent=1) + "\n")
    (voc / "generator.json").write_text(json.dumps(generator_settings(num_train, num_val, (low, high), seed, val_seed),
                                                   indent=1) + "\n")
    return voc


def study_palette() -> list[int]:
    """Flat [r, g, b, ...] colours that look like the classes: black background, each class its hue,
    pale for light, deep for dark (figures are easier to read than with VOC's colour map)."""
    colours = [0, 0, 0]
    for colour in range(len(COLOURS)):
        for tone in TONES:
            saturation, value = (0.45, 1.0) if tone == "light" else (1.0, 0.55)
            rgb = hsv_to_rgb(np.array([_HUE_CENTRES[colour]]), np.array([saturation]), np.array([value]))[0]
            colours += [int(round(float(c))) for c in rgb]
    return colours


def generator_settings(num_train: int, num_val: int, size: tuple[int, int], seed: int, val_seed: int) -> dict:
    """The arguments that determine a tree's bytes (what generator.json records)."""
    return {"generator": "cps_hf.data.study_scenes", "version": GENERATOR_VERSION, "num_train": num_train,
            "num_val": num_val, "size": list(size), "seed": seed, "val_seed": val_seed}
