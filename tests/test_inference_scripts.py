"""scripts/evaluate_cps.py and scripts/make_figures.py end to end on a tiny demo VOC and random-init models;
every user-run script's one-line answer to a typical mistake."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cps_hf import CPSConfig, CPSForSemanticSegmentation, CPSImageProcessor
from cps_hf.cli import run_cli
from cps_hf.data import DEMO_CLASSES, make_demo_voc
from cps_hf.errors import UserInputError
from repo_modules import load

SCRIPTS = Path(__file__).resolve().parents[1] / "scripts"


def load_script(name):
    return load(f"scripts/{name}.py")


def save_tiny_model(folder: Path, seed: int) -> str:
    torch.manual_seed(seed)
    config = CPSConfig(backbone="resnet18", num_labels=len(DEMO_CLASSES), id2label=dict(enumerate(DEMO_CLASSES)),
                       label2id={n: i for i, n in enumerate(DEMO_CLASSES)}, aspp_channels=16, decoder_channels=16,
                       low_level_channels=8)
    model = CPSForSemanticSegmentation(config).eval()
    model.save_pretrained(folder)
    CPSImageProcessor().save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    make_demo_voc(root / "voc", num_train=1, num_val=3, size=(32, 40), seed=0)
    return root, save_tiny_model(root / "sup", 0), save_tiny_model(root / "cps", 1)


def test_evaluate_cps_writes_eval_keys_matching_a_direct_evaluation(workspace, capsys):
    root, sup, cps = workspace
    evaluate_cps = load_script("evaluate_cps")
    output = root / "results.json"
    summary = evaluate_cps.main(["--model", sup, "--dataset", "voc", "--data_root", str(root / "voc"),
                                 "--crop_size", "48", "--output", str(output)])
    written = json.loads(output.read_text())
    assert written == json.loads(json.dumps(summary))
    assert {"eval_mean_iou", "eval_mean_accuracy", "eval_overall_accuracy", "eval_per_category_iou",
            "eval_per_category_accuracy"} <= set(written)
    assert written["protocol"] == {"mode": "whole", "crop_size": 48, "stride": None, "scales": [1.0], "flip": False,
                                   "branches": 1}
    assert written["num_samples"] == 3 and written["class_names"] == DEMO_CLASSES
    printed = capsys.readouterr().out
    assert "mIoU" in printed and "green" in printed

    # the same numbers straight from the library
    from cps_hf.data import EvalTransform, load_voc
    from cps_hf.inference import TransformedDataset, evaluate_model, load_segmentation_model

    model, mean, std = load_segmentation_model(sup, "cuda" if torch.cuda.is_available() else "cpu")  # the script's device
    data = TransformedDataset(load_voc(root / "voc", split="val"), EvalTransform(mean, std))
    direct = evaluate_model(model, data, num_labels=len(DEMO_CLASSES), crop_size=48)
    assert written["eval_mean_iou"] == pytest.approx(float(direct["mean_iou"]))


# An evaluate module written here, independent of cps_hf.metrics: per-image NumPy histograms over
# the maps evaluate hands back from its Arrow cache (images), as evaluate's own mean_iou computes.
HISTOGRAM_MEAN_IOU = """
import datasets  # one import per line: evaluate reads them to list the module's needs
import evaluate
import numpy as np


class HistogramMeanIoU(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(description="test", citation="", inputs_description="",
                                   features=datasets.Features({"predictions": datasets.Image(),
                                                               "references": datasets.Image()}))

    def _compute(self, predictions, references, num_labels, ignore_index, nan_to_num=None, label_map=None,
                 reduce_labels=False):
        assert not label_map and not reduce_labels and nan_to_num is None
        counts = np.zeros((3, num_labels))
        for prediction, reference in zip(predictions, references):
            prediction, reference = np.asarray(prediction), np.asarray(reference)
            keep = reference != ignore_index
            prediction, reference = prediction[keep], reference[keep]
            for row, values in enumerate((prediction[prediction == reference], prediction, reference)):
                counts[row] += np.histogram(values, bins=num_labels, range=(0, num_labels))[0]
        hits, predicted, labelled = counts
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = hits / (predicted + labelled - hits)
            accuracy = hits / labelled
        return {"mean_iou": np.nanmean(iou), "mean_accuracy": np.nanmean(accuracy),
                "overall_accuracy": hits.sum() / labelled.sum(), "per_category_iou": iou,
                "per_category_accuracy": accuracy, "computed_by": "histograms"}
"""


def test_evaluate_cps_metric_option_cross_checks_with_an_evaluate_module(workspace, tmp_path):
    """`--metric PATH` runs the same evaluation through an evaluate module (here one that shares no
    code with cps_hf.metrics): every number matches the streaming default."""
    root, sup, cps = workspace
    module_dir = tmp_path / "histogram_mean_iou"
    module_dir.mkdir()
    (module_dir / "histogram_mean_iou.py").write_text(HISTOGRAM_MEAN_IOU)
    evaluate_cps = load_script("evaluate_cps")
    common = ["--model", sup, "--dataset", "voc", "--data_root", str(root / "voc"), "--crop_size", "48"]
    default = evaluate_cps.main(common)
    crosscheck = evaluate_cps.main([*common, "--metric", str(module_dir)])
    assert crosscheck["metric"] == str(module_dir) and default["metric"] == "cps_hf"
    assert crosscheck["eval_computed_by"] == "histograms"  # the module really computed these numbers
    for key in ("eval_mean_iou", "eval_mean_accuracy", "eval_overall_accuracy", "eval_per_category_iou",
                "eval_per_category_accuracy"):
        assert crosscheck[key] == pytest.approx(default[key], nan_ok=True), key
    from cps_hf.errors import UserInputError

    with pytest.raises(UserInputError) as raised:
        evaluate_cps.main([*common, "--metric", "no_such_metric_here"])
    message = str(raised.value)
    assert message.startswith("--metric no_such_metric_here: could not load the evaluate metric")
    assert "\n" not in message


def test_evaluate_cps_both_branches_slide_flip(workspace, tmp_path):
    root, sup, cps = workspace
    evaluate_cps = load_script("evaluate_cps")
    summary = evaluate_cps.main(["--model", sup, "--model2", cps, "--both_branches", "--dataset", "voc",
                                 "--data_root", str(root / "voc"), "--mode", "slide", "--crop_size", "24",
                                 "--scales", "0.75", "1.0", "--flip", "--max_samples", "1"])
    assert summary["protocol"]["branches"] == 2 and summary["protocol"]["stride"] == 16
    assert summary["num_samples"] == 1
    assert 0.0 <= summary["eval_overall_accuracy"] <= 1.0
    with pytest.raises(UserInputError, match="--both_branches needs --model2"):
        evaluate_cps.parse_args(["--model", sup, "--both_branches", "--dataset", "voc", "--data_root", "x"])


def test_make_figures_grid_and_curves(workspace, tmp_path):
    root, sup, cps = workspace
    log = tmp_path / "run" / "log.jsonl"
    log.parent.mkdir()
    records = [{"step": s, "lr": 0.01 * (1 - s / 10) ** 0.9, "loss": 3 - s / 5, "loss_sup": 1 - s / 20,
                "loss_cps": 2 - s / 10, "agreement": 0.6 + s / 50} for s in range(10)]
    records.append({"step": 10, "eval_mean_iou": 0.3})
    log.write_text("".join(json.dumps(r) + "\n" for r in records))
    make_figures = load_script("make_figures")
    written = make_figures.main(["--models", sup, cps, "--titles", "Supervised", "CPS", "--dataset", "voc",
                                 "--data_root", str(root / "voc"), "--num_images", "2", "--cell_size", "40", "32",
                                 "--log", str(log.parent), "--output_dir", str(tmp_path / "figs")])
    assert [p.name for p in written] == ["comparison.png", "training_curves.png", "agreement.png",
                                         "eval_mean_iou.png"]
    with Image.open(written[0]) as grid:
        assert grid.size[0] == 4 * 40 + 5 * 4  # --cell_size is kept exactly
        assert grid.size[1] > 2 * 32 + 3 * 4 + 16  # plus the title band and the class legend
        cells = np.asarray(grid)
    assert cells[:, 4 + 44 : 4 + 84].std() > 0  # the ground-truth column is not blank
    for path in written[1:]:
        with Image.open(path) as picture:
            assert picture.format == "PNG"


# (script, its arguments with a typical mistake, what the error line must name); {tmp} is a fresh folder,
# {voc} a tiny VOC tree, {model} a model folder and {folder} a folder that is neither.
USER_MISTAKES = [
    ("evaluate_cps", "--model {tmp}/no/such/model --dataset voc --data_root {voc}", "--model {tmp}/no/such/model"),
    ("evaluate_cps", "--model {folder} --dataset voc --data_root {voc}", "--model {folder}: no config.json"),
    ("evaluate_cps", "--model {model} --dataset voc --data_root {tmp}/no_data", "--data_root {tmp}/no_data"),
    ("evaluate_cps", "--model {model} --dataset voc --data_root {voc} --split vall", "split 'vall'"),
    ("predict", "--model {model} --inputs {tmp}/missing.png --output_dir {tmp}/out", "--inputs {tmp}/missing.png"),
    ("make_figures", "--log {tmp}/no_run --output_dir {tmp}/figs", "--log {tmp}/no_run"),
    ("check_dataset", "--dataset voc --root {tmp}/no_data", "--root {tmp}/no_data"),
    ("prepare_voc_aug", "--voc_root {tmp}/no_voc --sbd_root {folder}", "--voc_root {tmp}/no_voc"),
    ("compare_methods", "--config {tmp}/missing.yaml --output_dir {tmp}/cmp", "--config {tmp}/missing.yaml"),
    ("make_demo_data", "--out {tmp}/demo --min-size 90 --max-size 40", "--min_size 90 is above --max_size 40"),
]


@pytest.mark.parametrize("script, argv, culprit", USER_MISTAKES,
                         ids=[f"{case[0]}-{index}" for index, case in enumerate(USER_MISTAKES)])
def test_a_user_mistake_is_one_error_line_with_exit_status_2(script, argv, culprit, workspace, tmp_path, capsys):
    root, model, _ = workspace
    names = {"tmp": tmp_path, "voc": root / "voc", "model": model, "folder": root}
    status = run_cli(load_script(script).main, argv.format(**names).split())
    lines = capsys.readouterr().err.splitlines()
    assert status == 2 and len(lines) == 1, lines
    assert lines[0].startswith("error: ") and culprit.format(**names) in lines[0], lines[0]


# Every script's --help describes every flag and shows its default; a bad flag value is one line too.
SCRIPT_NAMES = sorted(path.stem for path in SCRIPTS.glob("*.py"))


class _Parsed(Exception):
    def __init__(self, parser):
        self.parser = parser


def _parser_of(script, monkeypatch):
    """The argparse parser a script builds for its flags (the one with --help; a pre-parser has none)."""
    import argparse

    original = argparse.ArgumentParser.parse_known_args

    def capture(self, *args, **kwargs):
        if self.add_help:
            raise _Parsed(self)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(argparse.ArgumentParser, "parse_known_args", capture)
    if "/" in script:  # a path from the repository root, e.g. benchmarks/ssl_study.py
        path = Path(__file__).resolve().parents[1] / script
        monkeypatch.syspath_prepend(str(path.parent))  # a study script imports its parts from beside it
        module = load(script, f"_help_{path.stem}")
    else:
        module = load_script(script)
    parse = module.parse_args if hasattr(module, "parse_args") and script != "train_cps" else module.main
    with pytest.raises(_Parsed) as caught:
        try:
            parse(["--help"])
        except TypeError:  # a main() that reads sys.argv itself
            monkeypatch.setattr(sys, "argv", [script, "--help"])
            parse()
    return caught.value.parser


@pytest.mark.parametrize("script", SCRIPT_NAMES)
def test_help_describes_every_flag_with_its_default(script, monkeypatch):
    import argparse

    parser = _parser_of(script, monkeypatch)
    formatter = parser._get_formatter()
    undocumented, no_default = [], []
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction) or action.help == argparse.SUPPRESS:
            continue
        name = action.option_strings[0] if action.option_strings else action.dest
        if not (action.help or "").strip():
            undocumented.append(name)
            continue
        text = formatter._get_help_string(action)
        has_default = not (action.default is None or action.default is False or action.default == argparse.SUPPRESS)
        if has_default and "default" not in text.lower():
            no_default.append(name)
    assert not undocumented, f"{script}: flags without help: {undocumented}"
    assert not no_default, f"{script}: help hides the default of {no_default}"
    assert all(not option.startswith("--") or "-" not in option[2:]
               for action in parser._actions for option in action.option_strings[:1]), \
        f"{script}: flags are --snake_case (hyphenated forms may follow as aliases)"
