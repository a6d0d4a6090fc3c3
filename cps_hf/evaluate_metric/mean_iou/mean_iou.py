"""evaluate-loadable mean IoU that computes with `cps_hf.metrics.MeanIoU`.

Load it offline with `evaluate.load(cps_hf.evaluate_metric.MEAN_IOU_PATH)` (or the absolute path of
this folder) and call it exactly like evaluate's Hub `mean_iou`:

    metric = evaluate.load(MEAN_IOU_PATH)
    metric.compute(predictions=maps, references=maps, num_labels=21, ignore_index=255)

evaluate stores the maps in its Arrow cache until `compute`, so this keeps evaluate's interface
(and its num_process/process_id distributed mode) rather than its speed; use `MeanIoU` directly
for streaming evaluation. Differences from the Hub metric: predictions or references outside
`[0, num_labels)` at counted pixels raise a `ValueError` instead of being silently dropped.
"""

from typing import Dict, Optional

import datasets
import evaluate

from cps_hf.metrics import MeanIoU as StreamingMeanIoU

_DESCRIPTION = """Mean Intersection-over-Union over a dataset-wide confusion matrix (same results as evaluate's
`mean_iou`), computed by cps_hf.metrics.MeanIoU."""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of predicted class-id maps (H, W); sizes may differ between items.
    references: list of reference class-id maps, same sizes as the predictions.
    num_labels (int): number of classes.
    ignore_index (int): reference value skipped during evaluation.
    nan_to_num (float, optional): replaces NaN in every result.
    label_map (dict, optional): old reference id -> new id, applied to the original values.
    reduce_labels (bool): 0 becomes 255 and the other reference values shift down by one.
Returns:
    mean_iou, mean_accuracy, overall_accuracy (float) and per_category_iou, per_category_accuracy
    (arrays of length num_labels; NaN for classes absent from both predictions and references).
"""

_CITATION = """@inproceedings{chen2021semi,
  title={Semi-Supervised Semantic Segmentation with Cross Pseudo Supervision},
  author={Chen, Xiaokang and Yuan, Yuhui and Zeng, Gang and Wang, Jingdong},
  booktitle={CVPR}, year={2021}
}"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class MeanIoU(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            # Same features as the Hub metric so that callers can swap one for the other.
            features=datasets.Features({"predictions": datasets.Image(), "references": datasets.Image()}),
        )

    def _compute(
        self,
        predictions,
        references,
        num_labels: int,
        ignore_index: int,
        nan_to_num: Optional[float] = None,
        label_map: Optional[Dict[int, int]] = None,
        reduce_labels: bool = False,
    ):
        metric = StreamingMeanIoU(
            num_labels,
            ignore_index=ignore_index,
            nan_to_num=nan_to_num,
            label_map=label_map,
            reduce_labels=reduce_labels,
        )
        for prediction, reference in zip(predictions, references):
            metric.add(prediction=prediction, reference=reference)
        return metric.compute()
