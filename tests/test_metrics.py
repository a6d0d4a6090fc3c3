"""MeanIoU against a per-image NumPy reference (evaluate's way of computing) and hand-computed cases."""

import os
import tempfile
import warnings

import numpy as np
import pytest
import torch

from cps_hf.metrics import MeanIoU, metrics_from_confusion_matrix

KEYS = ("mean_iou", "mean_accuracy", "overall_accuracy", "per_category_iou", "per_category_accuracy")


def reference_mean_iou(predictions, references, num_labels, ignore_index, nan_to_num=None, label_map=None,
                       reduce_labels=False):
    """evaluate's mean_iou algorithm: per image, mask, three histograms over [0, num_labels - 1]."""
    totals = np.zeros((4, num_labels), dtype=np.float64)  # intersect, union, pred, label
    for prediction, reference in zip(predictions, references):
        prediction = np.array(prediction)
        reference = np.array(reference).astype(np.int64)
        if label_map:
            original = reference.copy()
            for old_id, new_id in label_map.items():
                reference[original == old_id] = new_id
        if reduce_labels:
            reference[reference == 0] = 255
            reference = reference - 1
            reference[reference == 254] = 255
        keep = reference != ignore_index
        prediction, reference = prediction[keep], reference[keep]
        hist = lambda values: np.histogram(values, bins=num_labels, range=(0, num_labels - 1))[0]  # noqa: E731
        intersect = hist(prediction[prediction == reference])
        area_pred, area_label = hist(prediction), hist(reference)
        totals += [intersect, area_pred + area_label - intersect, area_pred, area_label]
    intersect, union, _, area_label = totals
    with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # nanmean of an all-NaN array
        iou, acc = intersect / union, intersect / area_label
        result = {
            "mean_iou": np.nanmean(iou),
            "mean_accuracy": np.nanmean(acc),
            "overall_accuracy": intersect.sum() / area_label.sum(),
            "per_category_iou": iou,
            "per_category_accuracy": acc,
        }
    if nan_to_num is not None:
        result = {k: np.nan_to_num(v, nan=nan_to_num) for k, v in result.items()}
    return result


def assert_same(result, expected):
    assert set(result) == set(KEYS)
    for key in KEYS:
        np.testing.assert_array_equal(result[key], expected[key], err_msg=key)  # NaN == NaN here


def random_maps(rng, shape, num_labels, ignore_fraction=0.1, dtype=np.int64):
    reference = rng.integers(0, num_labels, shape)
    reference[rng.random(shape) < ignore_fraction] = 255
    # Predictions agree with the reference 60% of the time so IoUs are not all tiny.
    prediction = np.where(rng.random(shape) < 0.6, np.minimum(reference, num_labels - 1),
                          rng.integers(0, num_labels, shape))
    return prediction.astype(np.int64), reference.astype(dtype)


# ---------------------------------------------------------------- reference equality
@pytest.mark.parametrize("ref_dtype", [np.uint8, np.int64, np.int32])
def test_matches_reference_on_random_batches(ref_dtype):
    rng = np.random.default_rng(0)
    metric = MeanIoU(num_labels=7)
    preds, refs = [], []
    for _ in range(3):
        prediction, reference = random_maps(rng, (4, 24, 31), 7, dtype=ref_dtype)
        metric.add_batch(predictions=torch.from_numpy(prediction), references=torch.from_numpy(reference))
        preds += list(prediction)
        refs += list(reference)
    assert_same(metric.compute(), reference_mean_iou(preds, refs, 7, 255))


def test_matches_reference_on_lists_of_different_sizes_and_numpy_and_pil():
    from PIL import Image

    rng = np.random.default_rng(1)
    pairs = [random_maps(rng, shape, 5, dtype=np.uint8) for shape in [(10, 13), (7, 7), (20, 3)]]
    metric = MeanIoU(num_labels=5)
    metric.add_batch(predictions=[p for p, _ in pairs[:2]], references=[Image.fromarray(r) for _, r in pairs[:2]])
    metric.add(prediction=pairs[2][0], reference=pairs[2][1])  # (H, W) numpy
    assert_same(metric.compute(), reference_mean_iou([p for p, _ in pairs], [r for _, r in pairs], 5, 255))


def test_streaming_equals_one_batch_and_does_not_touch_inputs():
    rng = np.random.default_rng(2)
    prediction, reference = random_maps(rng, (6, 16, 16), 4)
    prediction32 = torch.from_numpy(prediction).int()
    kept = prediction32.clone()
    whole, streamed = MeanIoU(4), MeanIoU(4)
    whole.add_batch(predictions=prediction32, references=torch.from_numpy(reference))
    for i in range(6):
        streamed.add_batch(predictions=prediction32[i], references=reference[i])
    assert torch.equal(whole.confusion_matrix, streamed.confusion_matrix)
    assert torch.equal(prediction32, kept)
    assert int(whole.confusion_matrix.sum()) == int((reference != 255).sum())


def test_chunk_boundaries_do_not_change_the_counts(monkeypatch):
    import cps_hf.metrics

    rng = np.random.default_rng(7)
    prediction, reference = random_maps(rng, (3, 10, 10), 5)
    one_chunk = MeanIoU(5)
    one_chunk.add_batch(predictions=prediction, references=reference)
    monkeypatch.setattr(cps_hf.metrics, "_CHUNK_PIXELS", 7)  # 300 pixels -> 43 chunks, the last one partial
    many_chunks = MeanIoU(5)
    many_chunks.add_batch(predictions=prediction, references=reference)
    assert torch.equal(one_chunk.confusion_matrix, many_chunks.confusion_matrix)


def test_many_classes_and_wide_reference_values_take_the_compacting_path():
    rng = np.random.default_rng(3)
    prediction = rng.integers(0, 150, (2, 30, 30))
    reference = rng.integers(0, 150, (2, 30, 30))
    reference[:, :5] = -1  # negative ignore value
    reference[:, -3:] = 100_000  # huge ignore-like value mapped away below
    label_map = {100_000: -1}
    metric = MeanIoU(150, ignore_index=-1, label_map=label_map)
    metric.add_batch(predictions=prediction, references=reference)
    assert_same(metric.compute(), reference_mean_iou(prediction, reference, 150, -1, label_map=label_map))


# ---------------------------------------------------------------- hand-computed cases
def test_hand_computed_two_class_case():
    prediction = np.array([[0, 0, 1], [1, 1, 0]])
    reference = np.array([[0, 1, 1], [1, 255, 0]])
    metric = MeanIoU(num_labels=2)
    metric.add_batch(predictions=prediction, references=reference)
    result = metric.compute()
    # counted pixels: (p0,r0) (p0,r1) (p1,r1) (p1,r1) (p0,r0); the (p1, r255) pixel is ignored.
    # class 0: inter 2, pred 3, label 2 -> IoU 2/3, acc 1; class 1: inter 2, pred 2, label 3 -> IoU 2/3, acc 2/3
    np.testing.assert_allclose(result["per_category_iou"], [2 / 3, 2 / 3])
    np.testing.assert_allclose(result["per_category_accuracy"], [1.0, 2 / 3])
    assert result["mean_iou"] == pytest.approx(2 / 3)
    assert result["mean_accuracy"] == pytest.approx(5 / 6)
    assert result["overall_accuracy"] == pytest.approx(4 / 5)
    assert metric.confusion_matrix.tolist() == [[2, 0], [1, 2]]  # rows: reference, columns: prediction


def test_evaluate_documented_example():
    """The numbers printed in evaluate's mean_iou documentation (includes a prediction of 255 on an ignored pixel)."""
    predicted = [np.array([[1, 2], [3, 4], [5, 255]]), np.array([[2, 7], [9, 2], [3, 6]]),
                 np.array([[2, 2, 3], [8, 2, 4], [3, 255, 2]])]
    actual = [np.array([[0, 3], [5, 4], [6, 255]]), np.array([[1, 7], [9, 2], [3, 6]]),
              np.array([[1, 2, 2], [8, 2, 1], [3, 255, 1]])]
    metric = MeanIoU(num_labels=10, ignore_index=255)
    metric.add_batch(predictions=predicted, references=actual)
    result = metric.compute()
    assert result["mean_iou"] == pytest.approx(0.4775)
    assert result["mean_accuracy"] == pytest.approx(0.5916666666666666)
    assert result["overall_accuracy"] == pytest.approx(0.5263157894736842)
    np.testing.assert_allclose(result["per_category_iou"], [0, 0, 0.375, 0.4, 0.5, 0, 0.5, 1, 1, 1])


def test_absent_classes_are_nan_and_skipped_by_the_means():
    metric = MeanIoU(num_labels=4)
    metric.add_batch(predictions=np.array([[0, 1]]), references=np.array([[0, 0]]))
    result = metric.compute()
    # class 0: IoU 1/2, acc 1/2; class 1: IoU 0, acc NaN (no reference pixel); classes 2, 3: NaN
    np.testing.assert_array_equal(result["per_category_iou"], [0.5, 0.0, np.nan, np.nan])
    np.testing.assert_array_equal(result["per_category_accuracy"], [0.5, np.nan, np.nan, np.nan])
    assert result["mean_iou"] == pytest.approx(0.25)
    assert result["mean_accuracy"] == pytest.approx(0.5)


def test_nan_to_num_replaces_every_nan():
    metric = MeanIoU(num_labels=3, nan_to_num=-1)
    metric.add_batch(predictions=np.array([[0, 0]]), references=np.array([[0, 255]]))
    result = metric.compute()
    np.testing.assert_array_equal(result["per_category_iou"], [1.0, -1, -1])
    assert result["mean_iou"] == 1.0  # nan_to_num is applied after the means, as evaluate does
    empty = MeanIoU(num_labels=2, nan_to_num=0).compute()
    assert empty["mean_iou"] == 0 and empty["overall_accuracy"] == 0


def test_reduce_labels_turns_zero_into_ignore_and_shifts_the_rest():
    reference = np.array([[0, 1, 2, 255]], dtype=np.uint8)  # -> [ignore, 0, 1, ignore]
    prediction = np.array([[1, 0, 0, 1]])
    metric = MeanIoU(num_labels=2, reduce_labels=True)
    metric.add_batch(predictions=prediction, references=reference)
    assert metric.confusion_matrix.tolist() == [[1, 0], [1, 0]]
    assert_same(metric.compute(), reference_mean_iou([prediction], [reference], 2, 255, reduce_labels=True))


def test_label_map_reads_original_values():
    reference = np.array([[1, 2, 3]])
    prediction = np.array([[2, 1, 3]])
    label_map = {1: 2, 2: 1}  # a swap only works if every mapping reads the original values
    metric = MeanIoU(num_labels=4, label_map=label_map)
    metric.add_batch(predictions=prediction, references=reference)
    assert metric.compute()["overall_accuracy"] == 1.0
    assert_same(metric.compute(), reference_mean_iou([prediction], [reference], 4, 255, label_map=label_map))


# ---------------------------------------------------------------- bad input
def test_prediction_out_of_range_raises_instead_of_being_dropped():
    metric = MeanIoU(num_labels=3)
    with pytest.raises(ValueError, match=r"predictions contain class ids \[3\]"):
        metric.add_batch(predictions=np.array([[0, 3]]), references=np.array([[0, 1]]))
    with pytest.raises(ValueError, match=r"predictions contain class ids \[-1\]"):
        metric.add_batch(predictions=torch.tensor([[0, -1]], dtype=torch.int8), references=np.array([[0, 1]]))
    with pytest.raises(ValueError, match="predictions contain"):  # would wrap around in int32 arithmetic
        metric.add_batch(predictions=np.array([[0, 2**32 + 1]]), references=np.array([[0, 1]]))


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32, torch.int64])
def test_predictions_that_would_wrap_the_narrow_bin_index_raise(dtype):
    """21 classes x 256 uint8 reference values fit an int16 bin index. Out-of-range predictions must
    be refused, not counted: 259 * 256 wraps to bin 768 (a valid one) in int16 arithmetic."""
    metric = MeanIoU(num_labels=21)
    references = np.array([[0, 1, 2]], np.uint8)
    for bad in (21, 128, 255) + ((259,) if dtype != torch.uint8 else ()):
        predictions = torch.tensor([[0, bad, 2]], dtype=dtype)
        with pytest.raises(ValueError, match=rf"predictions contain class ids \[{bad}\]"):
            metric.add_batch(predictions=predictions, references=references)
    assert metric.confusion_matrix is None or int(metric.confusion_matrix.sum()) == 0


@pytest.mark.parametrize("num_labels, reference_dtype", [(21, np.uint8), (150, np.uint8), (200, np.int64)])
def test_index_width_does_not_change_the_result(num_labels, reference_dtype):
    """int16 bins (21 x 256), int32 bins (150 x 256 > 2**15) and wide references all match the reference."""
    rng = np.random.default_rng(num_labels)
    references = rng.integers(0, num_labels, (3, 40, 50)).astype(reference_dtype)
    references[rng.random(references.shape) < 0.1] = 255
    predictions = rng.integers(0, num_labels, references.shape)
    metric = MeanIoU(num_labels)
    metric.add_batch(predictions=predictions, references=references)
    assert_same(metric.compute(), reference_mean_iou(list(predictions), list(references), num_labels, 255))


def test_out_of_range_prediction_on_ignored_pixel_is_allowed():
    metric = MeanIoU(num_labels=3)
    metric.add_batch(predictions=np.array([[0, 7, -2]]), references=np.array([[0, 255, 255]]))
    assert metric.confusion_matrix.tolist() == [[1, 0, 0], [0, 0, 0], [0, 0, 0]]


def test_reference_out_of_range_raises():
    metric = MeanIoU(num_labels=19)
    with pytest.raises(ValueError, match=r"references contain values \[26, 33\].*train ids"):
        metric.add_batch(predictions=np.zeros((1, 3), np.int64), references=np.array([[26, 33, 255]], np.uint8))


def test_bad_types_and_shapes_raise_clearly():
    metric = MeanIoU(num_labels=3)
    with pytest.raises(TypeError, match="argmax"):
        metric.add_batch(predictions=torch.zeros(1, 3, 4, 4), references=torch.zeros(1, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="differs from references shape"):
        metric.add_batch(predictions=np.zeros((2, 4), np.int64), references=np.zeros((4, 2), np.int64))
    with pytest.raises(ValueError, match=r"\(H, W\) or \(B, H, W\)"):
        metric.add_batch(predictions=np.zeros((1, 1, 2, 2), np.int64), references=np.zeros((1, 1, 2, 2), np.int64))


# ---------------------------------------------------------------- distributed
def test_disjoint_shards_sum_to_the_single_process_result():
    rng = np.random.default_rng(4)
    prediction, reference = random_maps(rng, (5, 12, 12), 6)
    single = MeanIoU(6)
    single.add_batch(predictions=prediction, references=reference)
    shards = [MeanIoU(6), MeanIoU(6)]
    for i in range(5):
        shards[i % 2].add_batch(predictions=prediction[i], references=reference[i])
    total = shards[0].confusion_matrix + shards[1].confusion_matrix
    assert torch.equal(total, single.confusion_matrix)
    assert_same(metrics_from_confusion_matrix(total.numpy()), single.compute())


def test_sync_without_distributed_is_a_no_op_and_add_after_sync_raises():
    metric = MeanIoU(2)
    metric.add_batch(predictions=np.array([[0, 1]]), references=np.array([[0, 1]]))
    before = metric.confusion_matrix.clone()
    metric.sync(None)
    assert torch.equal(metric.confusion_matrix, before)
    with pytest.raises(RuntimeError, match="reset"):
        metric.add_batch(predictions=np.array([[0]]), references=np.array([[0]]))
    metric.reset()
    assert int(metric.confusion_matrix.sum()) == 0


def _gloo_worker(rank, world_size, init_file, predictions, references, out_dir):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        metric = MeanIoU(6)
        for i in range(rank, len(predictions), world_size):  # disjoint shards, no padding
            metric.add_batch(predictions=predictions[i], references=references[i])
        metric.sync()
        metric.sync()  # idempotent
        torch.save(metric.confusion_matrix, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


def test_sync_sums_matrices_over_two_gloo_processes():
    rng = np.random.default_rng(5)
    prediction, reference = random_maps(rng, (5, 10, 10), 6)
    single = MeanIoU(6)
    single.add_batch(predictions=prediction, references=reference)
    with tempfile.TemporaryDirectory() as tmp:
        torch.multiprocessing.start_processes(
            _gloo_worker, args=(2, os.path.join(tmp, "init"), prediction, reference, tmp), nprocs=2,
            start_method="fork",
        )
        for rank in range(2):
            assert torch.equal(torch.load(os.path.join(tmp, f"rank{rank}.pt")), single.confusion_matrix)


# ---------------------------------------------------------------- evaluate module
def test_evaluate_load_offline_matches_reference():
    import evaluate

    from cps_hf.evaluate_metric import MEAN_IOU_PATH

    rng = np.random.default_rng(6)
    pairs = [random_maps(rng, shape, 5, dtype=np.uint8) for shape in [(9, 11), (6, 6)]]
    predictions, references = [p for p, _ in pairs], [r for _, r in pairs]
    metric = evaluate.load(MEAN_IOU_PATH)
    with pytest.warns(UserWarning, match="Downcasting"):  # datasets stores int64 maps as int32 images
        result = metric.compute(predictions=predictions, references=references, num_labels=5, ignore_index=255,
                                reduce_labels=True, nan_to_num=0)
    assert_same(result, reference_mean_iou(predictions, references, 5, 255, nan_to_num=0, reduce_labels=True))


@pytest.mark.gpu
def test_cuda_inputs_give_the_cpu_result():
    rng = np.random.default_rng(8)
    prediction, reference = random_maps(rng, (3, 40, 40), 9, dtype=np.uint8)
    cpu, cuda = MeanIoU(9), MeanIoU(9)
    cpu.add_batch(predictions=prediction, references=reference)
    cuda.add_batch(predictions=torch.from_numpy(prediction).cuda(), references=torch.from_numpy(reference).cuda())
    assert cuda.confusion_matrix.device.type == "cuda"
    assert torch.equal(cuda.confusion_matrix.cpu(), cpu.confusion_matrix)
    with pytest.raises(ValueError, match="predictions contain"):
        cuda.add_batch(predictions=torch.full((2, 2), 9, device="cuda"), references=torch.zeros(2, 2, device="cuda",
                                                                                              dtype=torch.long))
