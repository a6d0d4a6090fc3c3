"""The paper's inference protocols and a dataset-wide evaluation loop.

What the original CPS code does (TorchSemiSeg's evaluator), and what is kept here:

- VOC: "whole image": the normalised image is padded (centred, value 0 = the mean colour after
  normalisation) up to the crop size when smaller, run once, and the padding cropped off the logits.
- Cityscapes: sliding windows of `crop_size` (800) with `stride` (534 = ceil(800 * 2/3)); the image
  is padded to at least one crop, windows are clamped to the image end, and window logits are
  summed over the overlaps. Here the sum is divided by the per-pixel window count. The original
  leaves the division out; at a single scale that gives the same argmax (every class at a pixel
  is divided by the same count), and with several scales it keeps each scale's weight equal.
- Multi-scale and flip: the image is resized per scale, the flipped image's logits are flipped
  back and added, the logits of every scale are resized to the input size and summed. Here sums
  become means (same argmax for flips; equal scale weights as above).
- Branches: the original evaluates branch 1 only. Passing a list of models averages their
  *logits* (the original's convention everywhere else: it never applies softmax before summing);
  `average="softmax"` averages their softmax probabilities instead (an ensemble of a run's
  networks) and returns the log of that mean as the logits of each forward pass, exactly what an
  exported `CPSEnsembleForSemanticSegmentation` computes, so both score the same.

Models are called as `model(pixel_values=x)` and must return `.logits` (or a tensor / tuple whose
first item is the logits) of shape (B, C, h, w); logits smaller than the input (e.g. SegFormer's
1/4 resolution) are upsampled bilinearly to it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, IterableDataset, Subset

from .errors import UserInputError
from .metrics import MeanIoU

ModelLike = Callable[..., object]


def _pair(size) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    height, width = size
    return int(height), int(width)


def _resize(tensor: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    if tuple(tensor.shape[-2:]) == tuple(size):
        return tensor
    return F.interpolate(tensor, size=size, mode="bilinear", align_corners=False)


def _logits_of(model: ModelLike, pixel_values: torch.Tensor) -> torch.Tensor:
    output = model(pixel_values=pixel_values)
    if hasattr(output, "logits"):
        logits = output.logits
    elif isinstance(output, (tuple, list)):
        logits = output[0]
    else:
        logits = output
    if not isinstance(logits, torch.Tensor) or logits.dim() != 4:
        raise ValueError(f"model output must hold logits of shape (B, C, h, w); got {type(output).__name__}")
    return _resize(logits.float(), tuple(pixel_values.shape[-2:]))


AVERAGES = ("logits", "softmax")


def _combine(models: Sequence[ModelLike], pixel_values: torch.Tensor, average: str) -> torch.Tensor:
    """The models' mean logits, or (`average="softmax"`) the log of their mean softmax probabilities."""
    if average == "logits":
        return sum(_logits_of(model, pixel_values) for model in models) / len(models)
    combined = None
    for model in models:
        log_probs = F.log_softmax(_logits_of(model, pixel_values), dim=1)
        combined = log_probs if combined is None else torch.logaddexp(combined, log_probs)
    return combined - math.log(len(models))


def _forward(models: Sequence[ModelLike], pixel_values: torch.Tensor, flip: bool,
             average: str = "logits") -> torch.Tensor:
    """Mean logits over branches (or log mean softmax, `average="softmax"`), and over the flipped input when `flip`."""
    logits = _combine(models, pixel_values, average)
    if flip:
        flipped = _combine(models, pixel_values.flip(-1), average)
        logits = (logits + flipped.flip(-1)) / 2
    return logits


def _pad_to(pixel_values: torch.Tensor, size: tuple[int, int]) -> tuple[torch.Tensor, tuple[int, int, int, int]]:
    """Centred zero padding up to `size` (as the original's pad_image_to_shape); returns the margins."""
    height, width = pixel_values.shape[-2:]
    pad_h, pad_w = max(size[0] - height, 0), max(size[1] - width, 0)
    top, left = pad_h // 2, pad_w // 2
    margins = (top, pad_h - top, left, pad_w - left)
    if pad_h or pad_w:
        pixel_values = F.pad(pixel_values, (left, pad_w - left, top, pad_h - top), value=0.0)
    return pixel_values, margins


def _crop_margins(logits: torch.Tensor, margins: tuple[int, int, int, int]) -> torch.Tensor:
    top, bottom, left, right = margins
    return logits[..., top : logits.shape[-2] - bottom, left : logits.shape[-1] - right]


def _window_starts(length: int, crop: int, stride: int) -> list[int]:
    """Window starts covering [0, length): every `stride`, the last one clamped to end at `length`."""
    count = math.ceil(max(length - crop, 0) / stride) + 1
    return sorted({min(index * stride, length - crop) for index in range(count)})


def _predict_whole(models, pixel_values, crop_size, flip, average="logits") -> torch.Tensor:
    if crop_size is None:
        return _forward(models, pixel_values, flip, average)
    padded, margins = _pad_to(pixel_values, crop_size)
    return _crop_margins(_forward(models, padded, flip, average), margins)


def _predict_slide(models, pixel_values, crop_size, stride, flip, average="logits") -> torch.Tensor:
    padded, margins = _pad_to(pixel_values, crop_size)
    height, width = padded.shape[-2:]
    total, counts = None, torch.zeros(1, 1, height, width, device=padded.device)
    for top in _window_starts(height, crop_size[0], stride[0]):
        for left in _window_starts(width, crop_size[1], stride[1]):
            window = padded[..., top : top + crop_size[0], left : left + crop_size[1]]
            logits = _forward(models, window, flip, average)
            if total is None:
                total = padded.new_zeros(padded.shape[0], logits.shape[1], height, width)
            total[..., top : top + crop_size[0], left : left + crop_size[1]] += logits
            counts[..., top : top + crop_size[0], left : left + crop_size[1]] += 1
    return _crop_margins(total / counts, margins)


@torch.no_grad()
def predict_logits(
    models: ModelLike | Sequence[ModelLike],
    pixel_values: torch.Tensor,
    mode: str = "whole",
    crop_size: int | tuple[int, int] | None = None,
    stride: int | tuple[int, int] | None = None,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    num_labels: int | None = None,
    average: str = "logits",
) -> torch.Tensor:
    """Logits (B, C, H, W) at the input size under one of the paper's inference protocols.

    Args:
        models: one model, or several (e.g. both CPS branches) whose logits are averaged.
        pixel_values: normalised images (B, 3, H, W).
        mode: "whole" (pad to `crop_size` if given and larger, run once) or "slide" (windows).
        crop_size: window size for "slide"; padding target for "whole" (None: no padding).
        stride: window step for "slide"; default ceil(2/3 * crop), the original's stride rate.
        scales: image scales; logits of each are resized back to (H, W) and averaged.
        flip: also run the horizontally flipped image and average.
        num_labels: if given, checked against the models' output channels.
        average: how several models are combined at each forward pass: "logits" (their mean, the
            original's) or "softmax" (an ensemble: the log of their mean softmax probabilities,
            whose argmax is the ensemble's prediction). Scales, flips and windows then average
            what that gives. One model with "logits" is the paper's evaluation.
    """
    models = list(models) if isinstance(models, (list, tuple)) else [models]
    if not models:
        raise ValueError("predict_logits needs at least one model")
    if average not in AVERAGES:
        raise ValueError(f"average must be one of {AVERAGES}, got {average!r}")
    if pixel_values.dim() != 4:
        raise ValueError(f"pixel_values must have shape (B, 3, H, W), got {tuple(pixel_values.shape)}")
    if mode not in ("whole", "slide"):
        raise ValueError(f"mode must be 'whole' or 'slide', got {mode!r}")
    if mode == "slide" and crop_size is None:
        raise ValueError("mode='slide' needs crop_size (the original uses 800 with stride 534 on Cityscapes)")
    crop = None if crop_size is None else _pair(crop_size)
    if crop is not None:
        steps = tuple(math.ceil(c * 2 / 3) for c in crop) if stride is None else _pair(stride)
        if min(crop) < 1 or min(steps) < 1:
            raise ValueError(f"crop_size and stride must be positive, got {crop} and {steps}")
    if not scales:
        raise ValueError("scales must hold at least one scale")

    size = tuple(pixel_values.shape[-2:])
    summed = None
    for scale in scales:
        scaled_size = (max(1, round(size[0] * scale)), max(1, round(size[1] * scale)))
        scaled = _resize(pixel_values, scaled_size)
        if mode == "whole":
            logits = _predict_whole(models, scaled, crop, flip, average)
        else:
            logits = _predict_slide(models, scaled, crop, steps, flip, average)
        logits = _resize(logits, size)
        summed = logits if summed is None else summed + logits
    logits = summed / len(scales)
    if num_labels is not None and logits.shape[1] != num_labels:
        raise ValueError(f"models return {logits.shape[1]} classes but num_labels={num_labels}")
    return logits


# ---------------------------------------------------------------------- dataset evaluation
def _rank_and_world(accelerator) -> tuple[int, int]:
    if accelerator is not None:
        return accelerator.process_index, accelerator.num_processes
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class _EveryNth(IterableDataset):
    """Items rank, rank + world, ... of an iterable: disjoint shards without padding."""

    def __init__(self, source: Iterable, rank: int, world: int):
        self.source, self.rank, self.world = source, rank, world

    def __iter__(self):
        for position, item in enumerate(self.source):
            if position % self.world == self.rank:
                yield item


def shard_for_process(dataset, rank: int, world: int):
    """This process's disjoint part of `dataset` (no repeated samples, unlike a prepared loader)."""
    if world == 1:
        return dataset
    if isinstance(dataset, IterableDataset) or not hasattr(dataset, "__len__"):
        return _EveryNth(dataset, rank, world)
    return Subset(dataset, range(rank, len(dataset), world))


def _loader_for_process(data, rank: int, world: int, batch_size: int, num_workers: int, collate_fn):
    if isinstance(data, DataLoader):
        if world == 1:
            return data
        # A custom batch_sampler (batch_size None) cannot be split by item: fall back to one image per batch.
        data, batch_size, num_workers, collate_fn = data.dataset, data.batch_size or 1, data.num_workers, data.collate_fn
    shard = shard_for_process(data, rank, world)
    return DataLoader(shard, batch_size=batch_size, shuffle=False, num_workers=num_workers, collate_fn=collate_fn)


def _split_batch(batch) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(batch, dict):
        if "pixel_values" not in batch or "labels" not in batch:
            raise KeyError(f"evaluation batches need 'pixel_values' and 'labels', got keys {sorted(batch)}")
        return batch["pixel_values"], batch["labels"]
    pixel_values, labels = batch[:2]
    return pixel_values, labels


def _model_device(models: Sequence[ModelLike]) -> torch.device:
    for model in models:
        if isinstance(model, torch.nn.Module):
            for parameter in model.parameters():
                return parameter.device
    return torch.device("cpu")


def evaluate_model(
    models: ModelLike | Sequence[ModelLike],
    data: Dataset | IterableDataset | DataLoader,
    num_labels: int,
    ignore_index: int = 255,
    mode: str = "whole",
    accelerator=None,
    *,
    crop_size: int | tuple[int, int] | None = None,
    stride: int | tuple[int, int] | None = None,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    batch_size: int = 1,
    num_workers: int = 0,
    collate_fn=None,
    label_map=None,
    reduce_labels: bool = False,
    nan_to_num=None,
    progress: bool = False,
    metric=None,
    average: str = "logits",
) -> dict:
    """mIoU of `models` on `data` under an inference protocol, with evaluate's `mean_iou` keys.

    `data` yields {"pixel_values": (3, H, W), "labels": (H, W)} items (or batches, for a
    DataLoader). In a distributed run each process evaluates a disjoint shard (every world-th
    item, no padding: an unprepared loader is re-sharded, so do not pass one prepared by
    accelerate), then the confusion matrices are summed, so no sample counts twice. Logits are
    resized to the label size when the two differ. Models are put in eval mode and restored.
    `metric` replaces the default `MeanIoU` with another object of its interface (add_batch, sync,
    compute), e.g. `cps_hf.metrics.EvaluateModuleMeanIoU` to cross-check against evaluate.
    `average` combines several models as in `predict_logits` ("softmax": an ensemble of a run's networks).
    """
    models = list(models) if isinstance(models, (list, tuple)) else [models]
    rank, world = _rank_and_world(accelerator)
    device = accelerator.device if accelerator is not None else _model_device(models)
    loader = _loader_for_process(data, rank, world, batch_size, num_workers, collate_fn)
    if metric is None:
        metric = MeanIoU(num_labels, ignore_index=ignore_index, nan_to_num=nan_to_num, label_map=label_map,
                         reduce_labels=reduce_labels, device=device)
    was_training = [getattr(model, "training", False) for model in models]
    for model in models:
        if isinstance(model, torch.nn.Module):
            model.eval()
    try:
        batches = loader
        if progress:
            from tqdm.auto import tqdm

            batches = tqdm(loader, desc="evaluating", disable=rank != 0)
        for batch in batches:
            pixel_values, labels = _split_batch(batch)
            logits = predict_logits(models, pixel_values.to(device), mode=mode, crop_size=crop_size, stride=stride,
                                    scales=scales, flip=flip, num_labels=num_labels, average=average)
            logits = _resize(logits, tuple(labels.shape[-2:]))
            metric.add_batch(predictions=logits.argmax(1), references=labels.to(device))
    finally:
        for model, training in zip(models, was_training):
            if isinstance(model, torch.nn.Module):
                model.train(training)
    return metric.sync(accelerator).compute()


# ---------------------------------------------------------------------- loading for the scripts
class TransformedDataset(Dataset):
    """Applies a per-item transform (e.g. `cps_hf.data.EvalTransform`) on indexing.

    `datasets.Dataset.with_transform` hands the transform a *batch* (dict of lists); this wrapper
    keeps per-item transforms per item and works with `Subset` sharding."""

    def __init__(self, dataset, transform):
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict:
        return self.transform(self.dataset[int(index)])


DEFAULT_PROTOCOLS = {
    # The original's evaluation: VOC whole image padded to the 512 crop; Cityscapes 800 windows, stride 534.
    "voc": {"mode": "whole", "crop_size": 512, "stride": None},
    "cityscapes": {"mode": "slide", "crop_size": 800, "stride": 534},
    "folder": {"mode": "whole", "crop_size": None, "stride": None},
}


def load_eval_split(dataset: str, data_root: str, split: str = "val"):
    """A labelled split as a `datasets.Dataset` (image, label, id) from one of cps_hf's loaders."""
    from .data import DatasetError, load_cityscapes, load_image_folder, load_voc

    loaders = {"voc": load_voc, "cityscapes": load_cityscapes, "folder": load_image_folder}
    if dataset not in loaders:
        raise DatasetError(f"--dataset must be one of {sorted(loaders)}, got {dataset!r}")
    if not Path(data_root).expanduser().is_dir():
        raise DatasetError(f"--data_root {data_root}: folder does not exist")
    return loaders[dataset](str(Path(data_root).expanduser()), split=split)


def looks_like_path(name: str) -> bool:
    """Hub ids are `name` or `owner/name`; more separators, a leading . ~ /, or a backslash mean a path."""
    return (name.startswith((".", "~", "/")) or "\\" in name or name.count("/") > 1 or name.endswith("/")
            or os.path.isabs(name))


def check_model_source(name: str, flag: str = "--model") -> str:
    """`name` as `from_pretrained` should get it: a folder with a config.json, or a well-formed Hub id.

    Anything else raises `UserInputError` naming `flag` and `name`, instead of huggingface_hub's
    "Repo id must be in the form ..." for a mistyped folder. Cheap (no model import, no network),
    so scripts call it before their slow imports."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserInputError(f"{flag} {name}: no config.json in that folder (give an exported model folder, "
                                 "e.g. a training run's model/)")
        return str(path)
    if path.exists():
        raise UserInputError(f"{flag} {name}: is a file, not a model folder (give the folder holding config.json)")
    if looks_like_path(name):
        raise UserInputError(f"{flag} {name}: folder does not exist")
    try:
        validate_repo_id(name)
    except HFValidationError:
        raise UserInputError(f"{flag} {name}: no such folder, and not a Hub model id (owner/name)") from None
    return name


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def load_segmentation_model(name_or_path: str, device: torch.device | str = "cpu", flag: str = "--model"):
    """(model in eval mode, image mean, image std) from a folder or Hub id via the Auto classes.

    A source that is not a model folder or a loadable Hub model raises `UserInputError`: one line
    naming `flag` (the script's option) and the source, with the first line of the cause."""
    import transformers
    from huggingface_hub.errors import StrictDataclassError

    from . import CPSForSemanticSegmentation  # noqa: F401  (registers the CPS Auto classes)

    source = check_model_source(name_or_path, flag)
    try:
        model = transformers.AutoModelForSemanticSegmentation.from_pretrained(source)
    except (OSError, ValueError, KeyError, StrictDataclassError) as err:  # not a model, a bad config.json
        raise UserInputError(f"{flag} {name_or_path}: cannot load a segmentation model ({_first_line(err)})") from err
    model = model.to(device).eval()
    try:
        processor = transformers.AutoImageProcessor.from_pretrained(source)
        mean, std = tuple(processor.image_mean), tuple(processor.image_std)
    except (OSError, ValueError, AttributeError, TypeError):  # no processor saved: the ImageNet statistics
        mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    return model, mean, std


def predict_class_ids(model, images: Sequence[np.ndarray], mean, std, protocol: dict, device) -> np.ndarray:
    """Class ids (B, H, W) of same-size RGB uint8 images (H, W, 3): normalised with the model's image
    statistics, then the argmax of `predict_logits` under `protocol` (scripts/predict.py, scripts/app.py)."""
    from .data.transforms import normalisation_table, normalise_into

    table = normalisation_table(mean, std)
    pixel_values = np.empty((len(images), 3) + images[0].shape[:2], dtype=np.float32)
    for index, image in enumerate(images):
        normalise_into(pixel_values[index], image, table)
    logits = predict_logits(model, torch.from_numpy(pixel_values).to(device), num_labels=model.config.num_labels,
                            **protocol)
    return logits.argmax(1).cpu().numpy()


def checkpoint_network_states(checkpoint_dir: str | os.PathLike,
                              flag: str = "--ensemble_checkpoint") -> list[tuple[str, dict]]:
    """(file name, state dict) of every network an accelerate `step_N` checkpoint holds, in the run's
    order: the trained networks (`model.safetensors`, `model_1.safetensors`, ...), then networks kept
    as custom state (a mean teacher's EMA teacher, `custom_checkpoint_<i>.pkl`, read tensors-only).
    Anything that is no such folder raises `UserInputError` naming `flag`."""
    from .weights import CPS_PREFIXES, _strip_wrappers, checkpoint_model_files, read_weights

    folder = Path(checkpoint_dir).expanduser()
    if not folder.is_dir():
        raise UserInputError(f"{flag} {checkpoint_dir}: folder does not exist (give a run's step_N checkpoint folder)")
    files = checkpoint_model_files(folder)
    if not files:
        raise UserInputError(f"{flag} {checkpoint_dir}: no model.safetensors in that folder (give a run's step_N "
                             "checkpoint folder, or use --models for exported model folders)")
    states = [(path.name, read_weights(path)) for path in files]
    custom = sorted(folder.glob("custom_checkpoint_*.pkl"), key=lambda path: int(path.stem.rsplit("_", 1)[1])
                    if path.stem.rsplit("_", 1)[1].isdigit() else -1)
    for path in custom:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception:  # not tensors-only (data-stream or progress state): not a network
            continue
        if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
            continue
        state = _strip_wrappers(state)
        if all(key.startswith(CPS_PREFIXES) for key in state):
            states.append((path.name, state))
    return states


def load_checkpoint_networks(checkpoint_dir: str | os.PathLike, architecture, device: torch.device | str = "cpu",
                             flag: str = "--ensemble_checkpoint") -> list:
    """Every network of a `step_N` checkpoint (`checkpoint_network_states`), each loaded into a copy of
    `architecture` (a single-network model, e.g. the run's exported `model/`), in eval mode on `device`."""
    import copy

    if hasattr(getattr(architecture, "config", None), "ensemble_size"):
        raise UserInputError(f"{flag}: --model is an ensemble export; give the run's single-network model/ folder "
                             "for the architecture")
    networks = []
    for name, state in checkpoint_network_states(checkpoint_dir, flag):
        network = copy.deepcopy(architecture)
        try:
            network.load_state_dict(state, strict=True)
        except RuntimeError as error:
            raise UserInputError(
                f"{flag} {checkpoint_dir}: {name} does not fit --model's architecture ({_first_line(error)[:300]}); "
                "give the --model folder this run exported"
            ) from None
        networks.append(network.to(device).eval())
    return networks


def make_eval_protocol(mode: str = "whole", crop_size: int | None = None, stride: int | None = None) -> dict:
    """The protocol a model records in `config.eval_protocol` (what the trainer evaluated with):
    explicit, so a reader needs no defaults. The stride of "whole" is unused (None); that of
    "slide" defaults to ceil(2/3 crop), as `predict_logits` does."""
    if mode not in ("whole", "slide"):
        raise ValueError(f"eval mode must be 'whole' or 'slide', got {mode!r}")
    crop_size = int(crop_size) if crop_size else None
    if mode == "whole":
        return {"mode": mode, "crop_size": crop_size, "stride": None}
    if crop_size is None:
        raise ValueError("the slide protocol needs a crop size (eval_crop_size or crop_size)")
    stride = int(stride) if stride else math.ceil(crop_size * 2 / 3)
    return {"mode": mode, "crop_size": crop_size, "stride": stride}


def model_eval_protocol(config) -> dict | None:
    """The protocol recorded in a model's config by the trainer; None for older exports and other models."""
    protocol = getattr(config, "eval_protocol", None)
    return None if protocol is None else make_eval_protocol(**protocol)


def describe_protocol(protocol: dict) -> str:
    """One readable line for logs and model cards, e.g. "whole image, padded to at least 512 px"."""
    if protocol["mode"] == "slide":
        return f"sliding {protocol['crop_size']} px windows, stride {protocol['stride']}"
    if protocol["crop_size"] is None:
        return "whole image at its own size"
    return f"whole image, padded to at least {protocol['crop_size']} px"


def resolve_protocol(dataset: str, mode: str | None = None, crop_size: int | None = None, stride: int | None = None,
                     scales: Sequence[float] = (1.0,), flip: bool = False, base: dict | None = None) -> dict:
    """Keyword arguments for `predict_logits`/`evaluate_model`: `base` (e.g. the protocol a model
    recorded, `model_eval_protocol`) or else the dataset's original protocol, overridden by
    whatever is given (`crop_size=0` means no crop/padding)."""
    if dataset not in DEFAULT_PROTOCOLS:
        raise ValueError(f"no default protocol for dataset {dataset!r}; known: {sorted(DEFAULT_PROTOCOLS)}")
    protocol = dict(base if base is not None else DEFAULT_PROTOCOLS[dataset])
    if mode is not None:
        protocol["mode"] = mode
    if crop_size is not None:
        protocol["crop_size"] = crop_size or None
    if stride is not None:
        protocol["stride"] = stride
    if protocol["mode"] == "slide" and protocol["crop_size"] is None:
        raise ValueError("the slide protocol needs a crop size")
    if protocol["mode"] == "slide" and protocol["stride"] is None:
        protocol["stride"] = math.ceil(protocol["crop_size"] * 2 / 3)
    return {**protocol, "scales": tuple(scales), "flip": bool(flip)}


def protocol_for_model(dataset: str, model_name: str, model_protocol: dict | None = None, mode: str | None = None,
                       crop_size: int | None = None, stride: int | None = None, scales: Sequence[float] = (1.0,),
                       flip: bool = False, default_name: str | None = None) -> tuple[dict, str]:
    """(protocol, where it came from) for the scripts: the protocol `model_name` recorded
    (`model_eval_protocol`), else the dataset's default (`default_name` says what that is, when
    "the <dataset> default" would not), with the given --mode/--crop_size/--stride on top.
    A protocol that cannot work raises `UserInputError` naming the flags."""
    if model_protocol is not None:
        source = f"{model_name}'s config.json eval_protocol (what the trainer evaluated with)"
    elif default_name is None:
        source = f"the {dataset} default (the original code's; the model records no eval_protocol)"
    else:
        source = f"{default_name} (the model records no eval_protocol)"
    if crop_size is not None and crop_size < 0:
        raise UserInputError(f"--crop_size must be positive (0: none), got {crop_size}")
    if stride is not None and stride < 1:
        raise UserInputError(f"--stride must be at least 1, got {stride}")
    if any(scale <= 0 for scale in scales):
        raise UserInputError(f"--scales must be positive, got {list(scales)}")
    given = {"mode": mode, "crop_size": crop_size, "stride": stride}
    overrides = [f"--{flag}" for flag, value in given.items() if value is not None]
    if overrides:
        source += f", overridden by {' '.join(overrides)}"
    try:
        protocol = resolve_protocol(dataset, mode, crop_size, stride, scales, flip, base=model_protocol)
    except ValueError as err:
        raise UserInputError(f"--mode/--crop_size: {err}") from err
    return protocol, source


def describe_protocol_choice(protocol: dict, source: str) -> str:
    """The line the scripts print: the protocol with its scales and flip, and where it came from."""
    return f"{describe_protocol(protocol)}, scales {list(protocol['scales'])}, flip {protocol['flip']}; from {source}"


def add_protocol_arguments(parser, fallback: str) -> None:
    """The scripts' --mode --crop_size --stride --scales --flip (read by `protocol_for_model`);
    `fallback` says which protocol applies to a model that records none."""
    parser.add_argument("--mode", choices=["whole", "slide"], help="whole image or sliding windows; default: the "
                        f"model's eval_protocol (what the trainer evaluated with), else {fallback}")
    parser.add_argument("--crop_size", type=int,
                        help="slide: window size; whole: pad smaller images up to it; 0 = none; default: as --mode")
    parser.add_argument("--stride", type=int, help="sliding-window step; default: as --mode, else ceil(2/3 crop)")
    parser.add_argument("--scales", type=float, nargs="+", default=[1.0], help="image scales whose logits are averaged")
    parser.add_argument("--flip", action="store_true", help="also average the horizontally flipped prediction")
