"""How much faster is cps_hf.metrics.MeanIoU than evaluate's way of computing mean IoU?

Both run in this process on the same predictions (int64 maps, as argmax returns them) and
references (uint8 maps, as PNG labels decode, with 255 on ~10% of pixels):

- baseline: evaluate's `mean_iou` algorithm, per image: mask the ignored pixels, then three NumPy
  histograms (intersection, prediction, reference) summed over images. Written out below.
- MeanIoU: one confusion matrix filled by chunked `torch.bincount` over int16 bin indices.

Results must be identical (asserted). The two sides take turns, `--repeats` runs each (the order
reversed every other repeat, so that load changing on a shared machine hits both alike); the speedup
is the best baseline time over the best MeanIoU time, also given as the median of the per-repeat
ratios and in process CPU time (which another job on the machine stretches less than wall time).
torch runs on `--threads` threads (default 1, the same as NumPy's single thread). `--include_arrow` also times
the evaluate.Metric path (maps stored as images in evaluate's Arrow cache), the way
`evaluate.load("mean_iou")` really runs.

    python benchmarks/metric_speed.py            # 64 maps of 512x512, 21 classes
    python benchmarks/metric_speed.py --quick    # smaller; last line is JSON with speedup_vs_evaluate
"""

import argparse
import json
import statistics
import time
import warnings

import numpy as np
import torch

from cps_hf.metrics import MeanIoU


def evaluate_style_mean_iou(predictions, references, num_labels, ignore_index):
    """evaluate's mean_iou computation: per-image masked NumPy histograms, totals, ratios."""
    totals = np.zeros((3, num_labels), dtype=np.float64)  # intersection, prediction area, reference area
    histogram_range = (0, num_labels - 1)
    for prediction, reference in zip(predictions, references):
        keep = reference != ignore_index
        prediction, reference = prediction[keep], reference[keep]
        hits = prediction[prediction == reference]
        totals[0] += np.histogram(hits, bins=num_labels, range=histogram_range)[0]
        totals[1] += np.histogram(prediction, bins=num_labels, range=histogram_range)[0]
        totals[2] += np.histogram(reference, bins=num_labels, range=histogram_range)[0]
    intersection, area_pred, area_label = totals
    with np.errstate(divide="ignore", invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        iou = intersection / (area_pred + area_label - intersection)
        accuracy = intersection / area_label
        return {
            "mean_iou": np.nanmean(iou),
            "mean_accuracy": np.nanmean(accuracy),
            "overall_accuracy": intersection.sum() / area_label.sum(),
            "per_category_iou": iou,
            "per_category_accuracy": accuracy,
        }


def meaniou_run(predictions, references, num_labels, ignore_index):
    metric = MeanIoU(num_labels, ignore_index=ignore_index)
    metric.add_batch(predictions=predictions, references=references)
    return metric.compute()


def evaluate_module_run(predictions, references, num_labels, ignore_index):
    import evaluate

    from cps_hf.evaluate_metric import MEAN_IOU_PATH

    metric = evaluate.load(MEAN_IOU_PATH)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # int64 -> int32 image downcast notice
        return metric.compute(predictions=list(predictions), references=list(references), num_labels=num_labels,
                              ignore_index=ignore_index)


def make_maps(num_maps, size, num_labels, seed):
    generator = torch.Generator().manual_seed(seed)
    references = torch.randint(0, num_labels, (num_maps, size, size), generator=generator, dtype=torch.uint8)
    references[torch.rand(references.shape, generator=generator) < 0.1] = 255
    guesses = torch.randint(0, num_labels, references.shape, generator=generator)
    correct = torch.rand(references.shape, generator=generator) < 0.7
    predictions = torch.where(correct & (references != 255), references.long(), guesses)  # int64, like argmax
    return predictions, references


def interleaved_times(functions: dict, repeats: int) -> tuple[dict, dict]:
    """(wall, CPU) seconds of every run of each function, the functions taking turns; and their results."""
    times, results = {name: [] for name in functions}, {}
    for repeat in range(repeats):
        for name in list(functions)[:: 1 if repeat % 2 == 0 else -1]:
            wall, cpu = time.perf_counter(), time.process_time()
            results[name] = functions[name]()
            times[name].append((time.perf_counter() - wall, time.process_time() - cpu))
    return times, results


def best_time(function, repeats):
    best, result = float("inf"), None
    for _ in range(repeats):
        start = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - start)
    return best, result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num_maps", type=int, default=64)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--num_labels", type=int, default=21)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="16 maps of 256x256, 3 repeats")
    parser.add_argument("--include_arrow", action="store_true", help="also time evaluate.load's Arrow-cached path")
    args = parser.parse_args()
    if args.quick:
        args.num_maps, args.size, args.repeats = 16, 256, 3
    torch.set_num_threads(args.threads)

    predictions, references = make_maps(args.num_maps, args.size, args.num_labels, args.seed)
    numpy_predictions, numpy_references = predictions.numpy(), references.numpy()  # views, not copies
    print(f"{args.num_maps} maps of {args.size}x{args.size}, {args.num_labels} classes, torch threads {args.threads}")

    times, results = interleaved_times({
        "baseline": lambda: evaluate_style_mean_iou(numpy_predictions, numpy_references, args.num_labels, 255),
        "meaniou": lambda: meaniou_run(predictions, references, args.num_labels, 255),
    }, args.repeats)
    expected, result = results["baseline"], results["meaniou"]
    baseline_s, meaniou_s = min(t[0] for t in times["baseline"]), min(t[0] for t in times["meaniou"])
    cpu_speedup = min(t[1] for t in times["baseline"]) / min(t[1] for t in times["meaniou"])
    paired = [b[0] / m[0] for b, m in zip(times["baseline"], times["meaniou"])]
    for key, value in expected.items():
        np.testing.assert_array_equal(result[key], value, err_msg=f"MeanIoU differs from the baseline on {key}")
    summary = {
        "num_maps": args.num_maps,
        "size": args.size,
        "num_labels": args.num_labels,
        "torch_threads": args.threads,
        "evaluate_style_seconds": round(baseline_s, 5),
        "meaniou_seconds": round(meaniou_s, 5),
        "speedup_vs_evaluate": round(baseline_s / meaniou_s, 2),
        "speedup_median_of_pairs": round(statistics.median(paired), 2),
        "speedup_cpu_time": round(cpu_speedup, 2),
        "mean_iou": float(result["mean_iou"]),
    }
    print(f"evaluate-style per-image NumPy: {baseline_s * 1000:8.1f} ms")
    print(f"MeanIoU (torch.bincount):       {meaniou_s * 1000:8.1f} ms   -> {summary['speedup_vs_evaluate']:.1f}x faster "
          f"(median of pairs {summary['speedup_median_of_pairs']:.1f}x, CPU time {summary['speedup_cpu_time']:.1f}x)")
    if args.include_arrow:
        arrow_s, arrow_result = best_time(
            lambda: evaluate_module_run(numpy_predictions, numpy_references, args.num_labels, 255), 1)
        np.testing.assert_array_equal(arrow_result["per_category_iou"], expected["per_category_iou"])
        summary["evaluate_arrow_seconds"] = round(arrow_s, 4)
        summary["speedup_vs_evaluate_arrow"] = round(arrow_s / meaniou_s, 1)
        print(f"evaluate.Metric with Arrow cache:{arrow_s * 1000:8.1f} ms   -> {summary['speedup_vs_evaluate_arrow']:.0f}x")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
