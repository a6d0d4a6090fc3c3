"""The trainer's evaluation protocol travels with the exported model, and evaluate_cps.py uses it.

The bug this guards against: the trainer scored the demo with whole images padded to its 64 px
crop, evaluate_cps.py re-scored the same export padded to VOC's 512, and the two disagreed.
"""

import json
from functools import partial
from pathlib import Path

import pytest
import torch
from huggingface_hub.errors import StrictDataclassClassValidationError

from cps_hf import CPSConfig, CPSForSemanticSegmentation
from cps_hf.data import DEMO_CLASSES, EvalTransform, make_demo_voc
from cps_hf.hub import export_model
import tiny_models
from cps_hf.inference import (TransformedDataset, evaluate_model, load_eval_split, load_segmentation_model,
                              make_eval_protocol, model_eval_protocol)
from repo_modules import load

# Unlike the VOC default (whole image padded to 512) in every key: a fallback to it cannot pass.
RECORDED = {"mode": "slide", "crop_size": 24, "stride": 16}
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the script's device (accelerate's default)


def load_evaluate_cps():
    return load("scripts/evaluate_cps.py")


tiny_config = partial(tiny_models.tiny_config, DEMO_CLASSES)


def export_tiny(folder: Path, **extra) -> str:
    """As the trainer exports network 1: export_model with a model card."""
    torch.manual_seed(0)
    model = CPSForSemanticSegmentation(tiny_config(**extra)).eval()
    export_model(model, folder, dataset_name="demo", dataset_type="voc", protocol="8", method="CPS")
    return str(folder)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("protocol")
    make_demo_voc(root / "voc", num_train=1, num_val=3, size=(32, 40), seed=0)
    return root / "voc", export_tiny(root / "recorded", eval_protocol=RECORDED), export_tiny(root / "old")


def direct_evaluation(model_dir: str, data_root: Path, **protocol) -> dict:
    model, mean, std = load_segmentation_model(model_dir, DEVICE)
    data = TransformedDataset(load_eval_split("voc", str(data_root)), EvalTransform(mean, std))
    return evaluate_model(model, data, num_labels=len(DEMO_CLASSES), **protocol)


def assert_same_results(summary: dict, direct: dict, plain) -> None:
    for key in ("mean_iou", "mean_accuracy", "overall_accuracy", "per_category_iou", "per_category_accuracy"):
        assert summary[f"eval_{key}"] == pytest.approx(plain(direct[key]), nan_ok=True), key


def test_evaluate_cps_defaults_to_the_protocol_the_model_recorded(workspace, capsys):
    data_root, recorded, _ = workspace
    evaluate_cps = load_evaluate_cps()
    summary = evaluate_cps.main(["--model", recorded, "--dataset", "voc", "--data_root", str(data_root)])
    assert summary["protocol"] == {**RECORDED, "scales": [1.0], "flip": False, "branches": 1}
    assert "eval_protocol" in summary["protocol_source"] and "overridden" not in summary["protocol_source"]
    printed = capsys.readouterr().out
    assert "sliding 24 px windows, stride 16" in printed and "eval_protocol" in printed
    # The numbers the trainer's evaluate_model call gives under that protocol, class by class.
    assert_same_results(summary, direct_evaluation(recorded, data_root, **RECORDED), evaluate_cps._plain)


def test_flags_override_the_recorded_protocol_and_old_exports_keep_the_dataset_default(workspace):
    data_root, recorded, old = workspace
    evaluate_cps = load_evaluate_cps()
    common = ["--dataset", "voc", "--data_root", str(data_root), "--max_samples", "1"]
    overridden = evaluate_cps.main(["--model", recorded, *common, "--mode", "whole", "--crop_size", "0"])
    assert overridden["protocol"]["mode"] == "whole" and overridden["protocol"]["crop_size"] is None
    assert overridden["protocol_source"].endswith("overridden by --mode --crop_size")
    stride_only = evaluate_cps.main(["--model", recorded, *common, "--stride", "8"])
    assert [stride_only["protocol"][key] for key in ("mode", "crop_size", "stride")] == ["slide", 24, 8]

    assert model_eval_protocol(load_segmentation_model(old)[0].config) is None
    fallback = evaluate_cps.main(["--model", old, *common])
    assert fallback["protocol"]["crop_size"] == 512 and fallback["protocol"]["mode"] == "whole"
    assert "voc default" in fallback["protocol_source"]


def test_the_model_card_states_the_recorded_protocol(workspace):
    _, recorded, old = workspace
    assert "| Evaluation protocol | sliding 24 px windows, stride 16, single scale" in (
        Path(recorded) / "README.md").read_text()
    assert "Evaluation protocol" not in (Path(old) / "README.md").read_text()


def test_make_eval_protocol_records_what_the_trainer_evaluates_with():
    """The trainer calls evaluate_model(mode, crop_size, stride=None): the recorded stride is the
    default predict_logits picks, and whole-image evaluation ignores the stride."""
    assert make_eval_protocol("slide", 24, None) == RECORDED
    assert make_eval_protocol("slide", 800, 534) == {"mode": "slide", "crop_size": 800, "stride": 534}
    assert make_eval_protocol("whole", 64, 40) == {"mode": "whole", "crop_size": 64, "stride": None}
    assert make_eval_protocol("whole", 0) == {"mode": "whole", "crop_size": None, "stride": None}
    with pytest.raises(ValueError, match="slide protocol needs a crop size"):
        make_eval_protocol("slide", None)
    with pytest.raises(ValueError, match="'whole' or 'slide'"):
        make_eval_protocol("tiles", 64)


def test_eval_protocol_round_trips_and_malformed_ones_name_the_field(tmp_path):
    tiny_config(eval_protocol=RECORDED).save_pretrained(tmp_path / "new")
    assert CPSConfig.from_pretrained(tmp_path / "new").eval_protocol == RECORDED
    tiny_config().save_pretrained(tmp_path / "old")
    saved = json.loads((tmp_path / "old" / "config.json").read_text())
    saved.pop("eval_protocol", None)  # an export made before the field existed
    (tmp_path / "old" / "config.json").write_text(json.dumps(saved))
    assert CPSConfig.from_pretrained(tmp_path / "old").eval_protocol is None
    for bad, message in [({"mode": "slide", "crop_size": 24}, "keys crop_size, mode, stride"),
                         ({"mode": "tiles", "crop_size": 24, "stride": None}, "'whole' or 'slide'"),
                         ({"mode": "whole", "crop_size": "64", "stride": None}, "positive integer"),
                         ({"mode": "slide", "crop_size": 24, "stride": None}, "needs a crop_size and a stride")]:
        with pytest.raises(StrictDataclassClassValidationError, match="eval_protocol") as error:
            tiny_config(eval_protocol=bad)
        assert message in str(error.value.__cause__), bad
