"""Streaming mean IoU with exactly the results of evaluate's `mean_iou`.

evaluate's `mean_iou` keeps every prediction and label map (through an Arrow cache) and computes
three NumPy histograms per image at the end. `MeanIoU` folds each batch into one
`num_labels x num_labels` confusion matrix as it arrives, so memory stays constant, the work is one
`torch.bincount` per chunk of pixels, and summing the matrices of several processes is exact.

Semantics (kept identical to evaluate's `mean_iou`):

- `label_map` is applied to the reference maps first, every mapping reading the *original* values;
  `reduce_labels` then turns 0 into 255 and lowers every other value by one (255 stays 255);
  pixels whose (mapped) reference equals `ignore_index` are skipped.
- per-class IoU = intersection / union, per-class accuracy = intersection / reference pixels,
  overall accuracy = all intersections / all counted reference pixels; classes absent from both
  predictions and references get NaN, and the means skip NaN (`np.nanmean`).
- `nan_to_num` replaces NaN in every returned value.

One deliberate difference: evaluate silently drops counted pixels whose prediction or reference
lies outside `[0, num_labels)` (its histograms have that range). That hides real bugs (a model with
the wrong head size, Cityscapes label ids instead of train ids), so `MeanIoU` raises a `ValueError`
naming the offending values instead. Predictions at ignored pixels are never looked at.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping

import numpy as np
import torch

# Pixels per bincount call: large enough to amortise the per-call overhead, small enough for the
# temporaries to stay in cache (measured on a 2-core CPU; see benchmarks/metric_speed.py).
_CHUNK_PIXELS = 1 << 18
# Above this many (prediction, raw reference value) bins, raw reference values are compacted first.
_MAX_JOINT_BINS = 1 << 22


class MeanIoU:
    """Accumulates a confusion matrix over batches and computes evaluate's `mean_iou` from it.

    Args:
        num_labels: number of classes `C`; valid ids are `0 .. C-1`.
        ignore_index: reference value to skip (after `label_map`/`reduce_labels`); `None` skips nothing.
        nan_to_num: if set, NaN in the results is replaced by this number.
        label_map: `{old_reference_id: new_reference_id}`, applied to the original values.
        reduce_labels: evaluate's ADE20k convention: 0 becomes `ignore` (255), the rest shift down by one.
        device: where the confusion matrix lives; by default the device of the first predictions.

    Distributed use: give each process a *disjoint* part of the evaluation set (no padding, as
    `cps_hf.inference.evaluate_model` does), call `add_batch` locally, then `sync(accelerator)`
    once to sum the matrices across processes. Do not feed batches from a loader prepared by
    accelerate with `even_batches=True`: it repeats samples to even out the last batch and the sum
    would count them twice. (Alternatively gather with `accelerator.gather_for_metrics`, which drops
    those repeats, and skip `sync`.)
    """

    def __init__(
        self,
        num_labels: int,
        ignore_index: int | None = 255,
        nan_to_num: float | None = None,
        label_map: Mapping[int, int] | None = None,
        reduce_labels: bool = False,
        device: torch.device | str | None = None,
    ):
        if int(num_labels) < 1:
            raise ValueError(f"num_labels must be >= 1, got {num_labels}")
        self.num_labels = int(num_labels)
        self.ignore_index = None if ignore_index is None else int(ignore_index)
        self.nan_to_num = nan_to_num
        self.label_map = {int(k): int(v) for k, v in (label_map or {}).items()}
        self.reduce_labels = bool(reduce_labels)
        self.device = None if device is None else torch.device(device)
        self.reset()

    # ------------------------------------------------------------------ state
    def reset(self) -> None:
        """Forget everything seen so far (keeps the settings)."""
        self.confusion_matrix = None if self.device is None else self._zeros(self.device)
        self._synced = False

    def _zeros(self, device) -> torch.Tensor:
        return torch.zeros(self.num_labels, self.num_labels, dtype=torch.int64, device=device)

    def _matrix(self, device) -> torch.Tensor:
        if self.confusion_matrix is None:
            self.device = torch.device(device)
            self.confusion_matrix = self._zeros(self.device)
        return self.confusion_matrix

    # ------------------------------------------------------------------ input
    def add_batch(self, *, predictions, references) -> None:
        """Add predicted and reference class-id maps: (H, W), (B, H, W), or lists of such maps
        (sizes may differ between list items). Tensors, NumPy arrays and PIL images are accepted."""
        if self._synced:
            raise RuntimeError("MeanIoU.add_batch after sync(): call reset() before adding a new evaluation.")
        pred_maps, ref_maps = _as_map_batches(predictions, "predictions"), _as_map_batches(references, "references")
        if len(pred_maps) != len(ref_maps):
            raise ValueError(f"got {len(pred_maps)} prediction batches/maps but {len(ref_maps)} reference ones")
        for pred, ref in zip(pred_maps, ref_maps):
            if pred.shape != ref.shape:
                raise ValueError(
                    f"predictions shape {tuple(pred.shape)} differs from references shape {tuple(ref.shape)}"
                )
            matrix = self._matrix(pred.device if self.confusion_matrix is None else self.device)
            matrix += self._confusion(pred.to(matrix.device), ref.to(matrix.device))

    def add(self, *, prediction, reference) -> None:
        """One map pair (evaluate's `add`)."""
        self.add_batch(predictions=[prediction], references=[reference])

    def _confusion(self, pred: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        """Confusion matrix (rows: reference class, columns: predicted class) of one batch.

        Works on raw reference values: a joint histogram over (prediction, raw reference value) is
        built with one bincount per chunk, then its columns are mapped to classes (label_map,
        reduce_labels, ignore) on the small histogram instead of on every pixel.
        """
        pred, ref = pred.reshape(-1), ref.reshape(-1)
        if pred.numel() == 0:
            return self._zeros(pred.device)
        ref, raw_values = _compact_references(ref)
        num_raw = int(raw_values.numel())
        joint = _joint_histogram(pred, ref, self.num_labels, num_raw)
        if joint is None:  # some prediction outside [0, C): allowed only where the reference is ignored
            pred = self._clean_ignored_predictions(pred, ref, raw_values)
            joint = _joint_histogram(pred, ref, self.num_labels, num_raw)
        return self._fold_columns(joint, raw_values)

    def _map_reference_values(self, raw_values: torch.Tensor) -> torch.Tensor:
        """Apply label_map then reduce_labels to the distinct raw reference values."""
        mapped = raw_values.clone()
        for old_id, new_id in self.label_map.items():
            mapped[raw_values == old_id] = new_id
        if self.reduce_labels:
            mapped = torch.where(mapped == 0, torch.full_like(mapped, 255), mapped) - 1
            mapped[mapped == 254] = 255
        return mapped

    def _column_classes(self, raw_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mapped = self._map_reference_values(raw_values)
        ignored = torch.zeros_like(mapped, dtype=torch.bool) if self.ignore_index is None else mapped == self.ignore_index
        valid = (mapped >= 0) & (mapped < self.num_labels) & ~ignored
        return mapped, ignored, valid

    def _fold_columns(self, joint: torch.Tensor, raw_values: torch.Tensor) -> torch.Tensor:
        mapped, ignored, valid = self._column_classes(raw_values.to(joint.device))
        counts = joint.sum(0)
        bad = ~valid & ~ignored & (counts > 0)
        if bool(bad.any()):
            raw_bad = raw_values.to(joint.device)[bad].tolist()
            raise ValueError(
                f"references contain values {raw_bad} that are neither a class id in [0, {self.num_labels}) "
                f"nor ignore_index={self.ignore_index} (after label_map/reduce_labels); "
                "check num_labels, ignore_index or the label encoding (e.g. Cityscapes label ids vs train ids)"
            )
        matrix = self._zeros(joint.device)
        matrix.index_add_(0, mapped[valid], joint[:, valid].T.contiguous())
        return matrix

    def _clean_ignored_predictions(self, pred, ref, raw_values) -> torch.Tensor:
        """Slow path, only for predictions outside [0, C): raise if any sits on a counted pixel."""
        _, ignored, _ = self._column_classes(raw_values)
        pixel_ignored = ignored[ref.long()]
        out_of_range = (pred < 0) | (pred >= self.num_labels)
        counted_bad = out_of_range & ~pixel_ignored
        if bool(counted_bad.any()):
            values = torch.unique(pred[counted_bad])[:10].tolist()
            raise ValueError(
                f"predictions contain class ids {values} outside [0, {self.num_labels}) at counted pixels; "
                "evaluate's mean_iou would silently drop them. Check num_labels against the model's head."
            )
        return torch.where(out_of_range, torch.zeros_like(pred), pred)

    # ------------------------------------------------------------------ distributed
    def sync(self, accelerator=None) -> "MeanIoU":
        """Sum the confusion matrix over all processes (all_reduce), once per evaluation.

        Uses `accelerator.reduce` when an `accelerate.Accelerator` is given, else
        `torch.distributed` when it is initialised, else does nothing. Each process must have seen a
        disjoint part of the data (see the class docstring).
        """
        if self._synced:
            return self
        matrix = self._matrix(self.device or "cpu")
        if accelerator is not None:
            if accelerator.num_processes > 1:
                summed = accelerator.reduce(matrix.to(accelerator.device), reduction="sum")
                self.confusion_matrix = summed.to(matrix.device)
        elif torch.distributed.is_available() and torch.distributed.is_initialized():
            if torch.distributed.get_world_size() > 1:
                backend_device = "cuda" if torch.distributed.get_backend() == "nccl" else "cpu"
                summed = matrix.to(backend_device)
                torch.distributed.all_reduce(summed, op=torch.distributed.ReduceOp.SUM)
                self.confusion_matrix = summed.to(matrix.device)
        self._synced = True
        return self

    # ------------------------------------------------------------------ output
    def compute(self) -> dict:
        """evaluate's `mean_iou` result: mean_iou, mean_accuracy, overall_accuracy (NumPy float64)
        and per_category_iou, per_category_accuracy (float64 arrays of length num_labels)."""
        matrix = self._matrix(self.device or "cpu").cpu().numpy()
        return metrics_from_confusion_matrix(matrix, nan_to_num=self.nan_to_num)


class EvaluateModuleMeanIoU:
    """An evaluate module with `mean_iou`'s interface (`evaluate.load("mean_iou")` from the Hub, or a
    local path) behind `MeanIoU`'s add_batch / sync / compute, to cross-check cps_hf's numbers.

    It keeps every map in evaluate's Arrow cache until `compute`, like evaluate does, and runs in a
    single process only: evaluate's own multi-process mode needs a shared experiment id and file
    locks, which the streaming `MeanIoU` does not need.
    """

    def __init__(self, name_or_path: str, num_labels: int, ignore_index: int | None = 255,
                 nan_to_num: float | None = None, label_map: Mapping[int, int] | None = None,
                 reduce_labels: bool = False):
        import evaluate

        self.name = name_or_path
        try:
            self.module = evaluate.load(name_or_path)
        except Exception as error:  # offline, unknown name, broken module: say which metric
            raise RuntimeError(f"could not load the evaluate metric {name_or_path!r}: {error}") from error
        self.compute_kwargs = {"num_labels": int(num_labels), "ignore_index": ignore_index, "nan_to_num": nan_to_num,
                               "label_map": dict(label_map or {}), "reduce_labels": bool(reduce_labels)}

    def add_batch(self, *, predictions, references) -> None:
        """Same inputs as `MeanIoU.add_batch`; maps go to evaluate as unsigned images (PNG-like)."""
        pred_maps = [m for t in _as_map_batches(predictions, "predictions") for m in _maps_of(t)]
        ref_maps = [m for t in _as_map_batches(references, "references") for m in _maps_of(t)]
        if len(pred_maps) != len(ref_maps):
            raise ValueError(f"got {len(pred_maps)} prediction maps but {len(ref_maps)} reference maps")
        self.module.add_batch(predictions=[_image_array(m, "predictions") for m in pred_maps],
                              references=[_image_array(m, "references") for m in ref_maps])

    def sync(self, accelerator=None) -> "EvaluateModuleMeanIoU":
        world = accelerator.num_processes if accelerator is not None else (
            torch.distributed.get_world_size()
            if torch.distributed.is_available() and torch.distributed.is_initialized() else 1)
        if world > 1:
            raise RuntimeError(f"the evaluate metric {self.name!r} is supported in a single process only; "
                               "use cps_hf's MeanIoU (the default) under accelerate launch")
        return self

    def compute(self) -> dict:
        return self.module.compute(**self.compute_kwargs)


def _maps_of(tensor: torch.Tensor) -> list[torch.Tensor]:
    return [tensor] if tensor.dim() == 2 else list(tensor)


def _image_array(tensor: torch.Tensor, name: str) -> np.ndarray:
    """A class-id map as the narrowest unsigned array an image can hold (uint8, else uint16)."""
    array = tensor.cpu().numpy()
    if array.size and (array.min() < 0 or array.max() > 65535):
        raise ValueError(f"{name}: values {array.min()}..{array.max()} do not fit a 16-bit label image")
    return array.astype(np.uint8 if array.size == 0 or array.max() <= 255 else np.uint16, copy=False)


def metrics_from_confusion_matrix(confusion_matrix, nan_to_num: float | None = None) -> dict:
    """evaluate-style metrics from a (reference x prediction) confusion matrix."""
    matrix = np.asarray(confusion_matrix, dtype=np.float64)
    intersect = np.diag(matrix)
    area_label = matrix.sum(axis=1)
    area_pred = matrix.sum(axis=0)
    union = area_pred + area_label - intersect
    with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # nanmean of all-NaN, as evaluate returns NaN
        iou = intersect / union
        accuracy = intersect / area_label
        results = {
            "mean_iou": np.nanmean(iou),
            "mean_accuracy": np.nanmean(accuracy),
            "overall_accuracy": intersect.sum() / area_label.sum(),
            "per_category_iou": iou,
            "per_category_accuracy": accuracy,
        }
    if nan_to_num is not None:
        results = {key: np.nan_to_num(value, nan=nan_to_num) for key, value in results.items()}
    return results


# ---------------------------------------------------------------------- helpers
def _as_tensor(value, name: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        tensor = value.detach()
    else:
        array = np.asarray(value)  # NumPy arrays, PIL images, nested lists
        if array.dtype == object:
            raise TypeError(f"{name}: cannot read a class-id map from {type(value).__name__}")
        with warnings.catch_warnings():  # read-only arrays (PIL views) are fine: inputs are never written
            warnings.simplefilter("ignore", UserWarning)
            tensor = torch.from_numpy(np.ascontiguousarray(array))
    if tensor.dtype == torch.bool:
        tensor = tensor.to(torch.uint8)
    if tensor.is_floating_point() or tensor.is_complex():
        raise TypeError(
            f"{name} must hold integer class ids, got dtype {tensor.dtype}"
            + (" (take argmax over the class dimension of the logits first)" if name == "predictions" else "")
        )
    return tensor


def _as_map_batches(value, name: str) -> list[torch.Tensor]:
    """Normalise input to a list of (H, W) or (B, H, W) integer tensors."""
    if isinstance(value, (list, tuple)):
        maps = [_as_tensor(item, name) for item in value]
    else:
        maps = [_as_tensor(value, name)]
    for tensor in maps:
        if tensor.dim() not in (2, 3):
            raise ValueError(f"{name}: expected maps of shape (H, W) or (B, H, W), got shape {tuple(tensor.shape)}")
    return maps


def _compact_references(ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Return (column index per pixel, raw value of each column).

    uint8 maps (PNG labels) index columns directly; other integer maps use their value range, or,
    when that range is huge or negative, the sorted distinct values.
    """
    if ref.dtype == torch.uint8:
        return ref, torch.arange(256, device=ref.device)
    low, high = (int(v) for v in torch.aminmax(ref))
    if low >= 0 and high < _MAX_JOINT_BINS // 256:
        return ref, torch.arange(high + 1, device=ref.device)
    raw_values, inverse = torch.unique(ref, return_inverse=True)
    return inverse, raw_values


def _joint_histogram(pred: torch.Tensor, ref_columns: torch.Tensor, num_labels: int, num_columns: int):
    """Counts of (prediction, reference column) pairs, shape (num_labels, num_columns); `None` when
    some prediction is outside [0, num_labels).

    Each chunk's predictions are range-checked first (one cheap min/max), so the bin index
    `prediction * num_columns + column` always fits the narrowest integer type that holds
    `num_labels * num_columns` bins: int16 for the common cases (21 or 19 classes with uint8 labels),
    which makes bincount's two passes cheaper than on int32 or int64."""
    size = num_labels * num_columns
    index_dtype = torch.int16 if size <= 2**15 else torch.int32 if size < 2**31 else torch.int64
    # Chunks keep CPU temporaries in cache; on accelerators one launch per op is faster.
    step = _CHUNK_PIXELS if pred.device.type == "cpu" else max(pred.numel(), 1)
    total = torch.zeros(num_labels, num_columns, dtype=torch.int64, device=pred.device)
    for start in range(0, pred.numel(), step):
        counts = _chunk_histogram(pred[start : start + step], ref_columns[start : start + step], num_labels,
                                  num_columns, index_dtype)
        if counts is None:
            return None
        total += counts
    return total


def _chunk_histogram(pred, columns, num_labels, num_columns, index_dtype):
    """(prediction, column) counts of one chunk, or `None` if a prediction is out of range."""
    low, high = torch.aminmax(pred)
    if int(low) < 0 or int(high) >= num_labels:
        return None
    index = pred.to(index_dtype, copy=True)  # never write into the input
    if columns.dtype not in (torch.uint8, index_dtype):
        columns = columns.to(index_dtype)  # mixed-dtype in-place adds are ~30x slower
    torch.add(columns, index, alpha=num_columns, out=index)  # one pass for index * num_columns + column
    return torch.bincount(index, minlength=num_labels * num_columns).view(num_labels, num_columns)
