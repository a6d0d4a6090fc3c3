"""Ensembles of a run's networks at inference: the softmax mean of all N networks (network 1 alone
stays the default everywhere).

- `CPSEnsembleForSemanticSegmentation`: logits = log(mean softmax) of its members; an ensemble of one
  predicts what its network predicts; export -> `from_pretrained` (native and `trust_remote_code`)
  and the pipeline give the ensemble's argmax at the input size; single-network exports are unchanged.
- `scripts/evaluate_cps.py --ensemble_checkpoint / --models` equals `evaluate_model` on the averaged
  probabilities, and equals scoring the exported ensemble.
Tiny random-init resnet18 / mobilenetv3_small_100 networks, on the CPU.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from huggingface_hub.errors import StrictDataclassError
from PIL import Image
from safetensors.torch import save_file
from transformers import AutoConfig, AutoModelForSemanticSegmentation, pipeline

import cps_hf  # noqa: F401  (registers the CPS Auto classes)
from cps_hf import (CPSConfig, CPSEnsembleConfig, CPSEnsembleForSemanticSegmentation, CPSForSemanticSegmentation,
                    CPSImageProcessor)
from cps_hf.data import DEMO_CLASSES, EvalTransform, make_demo_voc
from cps_hf.errors import UserInputError
from cps_hf.hub import export_ensemble, export_model
from cps_hf.inference import TransformedDataset, evaluate_model, load_eval_split, predict_logits

from tiny_models import logits_of, tiny_config, with_running_statistics
from repo_modules import load

ID2LABEL = {0: "bg", 1: "a", 2: "b"}
CARD = dict(dataset_name="toy", dataset_type="folder", protocol="1/8", method="CPS")
EXPORTED_FILES = ["README.md", "config.json", "configuration_cps.py", "image_processing_cps.py", "model.safetensors",
                  "modeling_cps.py", "preprocessor_config.json"]


def tiny_network(seed: int, backbone: str = "resnet18", id2label: dict = ID2LABEL) -> CPSForSemanticSegmentation:
    torch.manual_seed(seed)
    return with_running_statistics(CPSForSemanticSegmentation(tiny_config(list(id2label.values()), backbone)))


def log_mean_softmax(networks, pixel_values):
    """The ensemble's definition, computed directly."""
    return torch.stack([logits_of(n, pixel_values).softmax(1) for n in networks]).mean(0).log()


@pytest.fixture(scope="module")
def pixel_values():
    return torch.randn(2, 3, 48, 40, generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module")
def networks():
    return [tiny_network(seed) for seed in range(3)]


@pytest.fixture(scope="module")
def exported(networks, tmp_path_factory):
    return export_ensemble(networks, tmp_path_factory.mktemp("ens") / "model_ensemble",
                           network_names=["network_1", "network_2", "network_3"], **CARD)


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backbone", ["resnet18", "mobilenetv3_small_100"])
def test_ensemble_logits_are_the_log_of_the_mean_softmax(backbone, pixel_values):
    members = [tiny_network(seed, backbone) for seed in (3, 4)]
    ensemble = CPSEnsembleForSemanticSegmentation.from_networks(members).eval()
    assert isinstance(ensemble.config, CPSEnsembleConfig) and ensemble.config.ensemble_size == 2
    assert all(type(n.config) is CPSConfig for n in ensemble.networks)  # members are plain single networks
    logits = logits_of(ensemble, pixel_values)
    assert logits.shape == (2, 3, 48, 40)
    torch.testing.assert_close(logits, log_mean_softmax(members, pixel_values), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits.exp().sum(1), torch.ones(2, 48, 40), rtol=1e-5, atol=1e-5)
    # The copy is independent of the trained networks.
    assert ensemble.networks[0].decode_head.classifier.weight is not members[0].decode_head.classifier.weight


def test_ensemble_of_one_predicts_what_its_network_predicts(pixel_values):
    network = tiny_network(5)
    ensemble = CPSEnsembleForSemanticSegmentation.from_networks([network]).eval()
    single = logits_of(network, pixel_values)
    logits = logits_of(ensemble, pixel_values)
    assert torch.equal(logits.argmax(1), single.argmax(1))
    torch.testing.assert_close(logits, single.log_softmax(1), rtol=1e-5, atol=1e-5)


def test_ensemble_loss_is_the_nll_of_the_mean_probability(networks, pixel_values):
    ensemble = CPSEnsembleForSemanticSegmentation.from_networks(networks).eval()
    labels = torch.randint(0, 3, (2, 48, 40), generator=torch.Generator().manual_seed(2))
    labels[0, :4] = 255
    with torch.no_grad():
        loss = ensemble(pixel_values=pixel_values, labels=labels).loss
    expected = torch.nn.functional.nll_loss(log_mean_softmax(networks, pixel_values), labels, ignore_index=255)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)


def test_from_networks_refuses_networks_of_another_architecture():
    with pytest.raises(ValueError, match="network 2 of 2 does not have network 1's architecture"):
        CPSEnsembleForSemanticSegmentation.from_networks([tiny_network(0), tiny_network(1, "mobilenetv3_small_100")])
    with pytest.raises(StrictDataclassError, match="ensemble_size"):
        CPSEnsembleConfig(ensemble_size=0)
    with pytest.raises(StrictDataclassError, match="network_names"):
        CPSEnsembleConfig(ensemble_size=2, network_names=["only_one"])


# ---------------------------------------------------------------------------------------------
# Export, from_pretrained, pipeline
# ---------------------------------------------------------------------------------------------


def test_export_ensemble_round_trips_through_auto_classes(networks, exported, pixel_values):
    assert sorted(p.name for p in exported.iterdir()) == EXPORTED_FILES
    config = json.loads((exported / "config.json").read_text())
    assert config["model_type"] == "cps_deeplabv3plus_ensemble" and config["ensemble_size"] == 3
    assert config["network_names"] == ["network_1", "network_2", "network_3"]
    assert config["architectures"] == ["CPSEnsembleForSemanticSegmentation"]
    assert config["auto_map"]["AutoModelForSemanticSegmentation"] == "modeling_cps.CPSEnsembleForSemanticSegmentation"
    assert config["auto_map"]["AutoConfig"] == "configuration_cps.CPSEnsembleConfig"
    assert isinstance(AutoConfig.from_pretrained(exported), CPSEnsembleConfig)
    loaded = AutoModelForSemanticSegmentation.from_pretrained(exported).eval()
    assert isinstance(loaded, CPSEnsembleForSemanticSegmentation)
    torch.testing.assert_close(logits_of(loaded, pixel_values), log_mean_softmax(networks, pixel_values),
                               rtol=1e-5, atol=1e-5)
    card = (exported / "README.md").read_text()
    assert "all 3 networks of the run" in card and "| Networks | ensemble of 3 (softmax mean)" in card


def test_single_network_exports_are_unchanged_beside_ensembles(networks, tmp_path, pixel_values):
    """A single network still exports as before (no ensemble field, the single class in auto_map) and loads
    as `CPSForSemanticSegmentation`, whatever was exported before it."""
    folder = export_model(networks[0], tmp_path / "model", **CARD)
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "cps_deeplabv3plus" and "ensemble_size" not in config
    assert config["architectures"] == ["CPSForSemanticSegmentation"]
    assert config["auto_map"] == {"AutoConfig": "configuration_cps.CPSConfig",
                                  "AutoModelForSemanticSegmentation": "modeling_cps.CPSForSemanticSegmentation"}
    loaded = AutoModelForSemanticSegmentation.from_pretrained(folder).eval()
    assert type(loaded) is CPSForSemanticSegmentation and type(loaded.config) is CPSConfig
    torch.testing.assert_close(logits_of(loaded, pixel_values), logits_of(networks[0], pixel_values),
                               rtol=1e-5, atol=1e-5)
    assert "one of the two networks" in (folder / "README.md").read_text()
    assert CPSEnsembleConfig.__dict__.get("_auto_class") is None and CPSConfig.__dict__.get("_auto_class") is None


def test_pipeline_serves_the_ensemble_argmax_at_the_input_size(networks, exported):
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8))
    segmenter = pipeline("image-segmentation", model=str(exported), subtask="semantic")
    assert isinstance(segmenter.model, CPSEnsembleForSemanticSegmentation)
    segments = segmenter(image)
    assert segments and all(segment["mask"].size == image.size for segment in segments)
    inputs = CPSImageProcessor()(image, return_tensors="pt")
    expected = log_mean_softmax(networks, inputs["pixel_values"]).argmax(1)[0].numpy()
    assert expected.shape == (37, 53)
    label2id = {name: index for index, name in ID2LABEL.items()}
    predicted = np.full(expected.shape, -1)
    for segment in segments:
        mask = np.array(segment["mask"]) > 0
        assert (predicted[mask] == -1).all(), "two segments claim the same pixel"
        predicted[mask] = label2id[segment["label"]]
    assert np.array_equal(predicted, expected)


REMOTE_LOAD = """
import sys, torch
from transformers import AutoModelForSemanticSegmentation

model = AutoModelForSemanticSegmentation.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
torch.manual_seed(0)
with torch.no_grad():
    logits = model(pixel_values=torch.randn(2, 3, 32, 32)).logits
torch.save(logits, sys.argv[2])
print(type(model).__module__, type(model).__name__, "cps_hf" in sys.modules)
"""


def test_ensemble_export_loads_with_trust_remote_code_where_cps_hf_is_not_imported(networks, exported, tmp_path):
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    logits_file = tmp_path / "logits.pt"
    completed = subprocess.run([sys.executable, "-c", REMOTE_LOAD, str(exported), str(logits_file)],
                               capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr[-3000:]
    module, name, imported_cps_hf = completed.stdout.split()[-3:]
    assert module.startswith("transformers_modules.") and module.endswith(".modeling_cps")
    assert name == "CPSEnsembleForSemanticSegmentation" and imported_cps_hf == "False"
    torch.manual_seed(0)
    expected = log_mean_softmax(networks, torch.randn(2, 3, 32, 32))
    torch.testing.assert_close(torch.load(logits_file), expected, rtol=1e-5, atol=1e-5)


def test_pipeline_on_an_ensemble_export_neither_prompts_nor_warns(exported, tmp_path):
    """As for single exports (tests/test_hub.py): with cps_hf imported, no remote-code prompt, no
    "not supported" log for the ensemble class, cps_hf's own classes."""
    from test_hub import QUIET_PIPELINE

    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "modules"), "HF_HUB_OFFLINE": "1"}
    completed = subprocess.run([sys.executable, "-c", QUIET_PIPELINE, str(exported)], capture_output=True, text=True,
                               timeout=300, env=env, cwd=tmp_path, stdin=subprocess.DEVNULL)
    assert completed.returncode == 0, completed.stderr[-3000:]
    report = json.loads(completed.stdout.strip().splitlines()[-1])
    assert report["prompts"] == [] and report["records"] == [], report
    assert "not supported" not in completed.stderr and "custom code" not in completed.stderr
    assert report["model"] == "cps_hf.modeling_cps" and report["segments"] >= 1
    assert not (tmp_path / "modules").exists()


# ---------------------------------------------------------------------------------------------
# predict_logits / evaluate_model / evaluate_cps.py
# ---------------------------------------------------------------------------------------------


def test_predict_logits_softmax_average_is_the_ensemble_model(networks, pixel_values):
    ensemble = CPSEnsembleForSemanticSegmentation.from_networks(networks).eval()
    one = pixel_values[:1]
    for protocol in (dict(mode="whole", crop_size=56), dict(mode="slide", crop_size=32, scales=(0.75, 1.0), flip=True)):
        averaged = predict_logits(networks, one, average="softmax", **protocol)
        torch.testing.assert_close(averaged, predict_logits(ensemble, one, **protocol), rtol=1e-5, atol=1e-5)
    direct = predict_logits(networks, pixel_values, average="softmax")
    torch.testing.assert_close(direct, log_mean_softmax(networks, pixel_values), rtol=1e-5, atol=1e-5)
    # The default is unchanged: one network's logits, several networks' mean logits.
    torch.testing.assert_close(predict_logits(networks[0], pixel_values), logits_of(networks[0], pixel_values))
    mean_logits = sum(logits_of(n, pixel_values) for n in networks) / 3
    torch.testing.assert_close(predict_logits(networks, pixel_values), mean_logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="average"):
        predict_logits(networks, pixel_values, average="mean")


def load_script(name):
    return load(f"scripts/{name}.py")


class ProbabilityMean(torch.nn.Module):
    """The averaged probabilities as one model (independent of cps_hf's ensemble code)."""

    def __init__(self, members):
        super().__init__()
        self.members = torch.nn.ModuleList(members)

    def forward(self, pixel_values):
        return torch.stack([m(pixel_values=pixel_values).logits.softmax(1) for m in self.members]).mean(0).log()


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A demo VOC, a run's exported network 1 (`model/`) and a `step_N` checkpoint laid out as accelerate
    writes it: two trained networks (`model.safetensors`, `model_1.safetensors`), custom state that is no
    network (progress), and a network kept as custom state (a mean teacher's teacher)."""
    root = tmp_path_factory.mktemp("run")
    make_demo_voc(root / "voc", num_train=1, num_val=3, size=(32, 40), seed=0)
    id2label = dict(enumerate(DEMO_CLASSES))
    members = [tiny_network(seed, id2label=id2label) for seed in (10, 11, 12)]
    model = members[0]
    model.save_pretrained(root / "model")
    CPSImageProcessor().save_pretrained(root / "model")
    step = root / "step_4"
    step.mkdir()
    save_file(members[0].state_dict(), step / "model.safetensors")
    save_file({f"module.{k}": v.contiguous() for k, v in members[1].state_dict().items()}, step / "model_1.safetensors")
    torch.save({"step": 4, "best": None}, step / "custom_checkpoint_0.pkl")
    torch.save(members[2].state_dict(), step / "custom_checkpoint_1.pkl")
    (step / "random_states_0.pkl").write_bytes(pickle.dumps({"not": "a network"}))
    for index, member in enumerate(members[1:], start=2):
        member.save_pretrained(root / f"model_{index}")
        CPSImageProcessor().save_pretrained(root / f"model_{index}")
    return root, members


def direct(members, root, **protocol):
    data = TransformedDataset(load_eval_split("voc", str(root / "voc"), "val"),
                              EvalTransform(num_classes=len(DEMO_CLASSES)))
    return evaluate_model(ProbabilityMean(members), data, num_labels=len(DEMO_CLASSES), **protocol)


def assert_same_results(summary, results):
    for key in ("mean_iou", "overall_accuracy"):
        assert summary[f"eval_{key}"] == pytest.approx(float(results[key]), abs=1e-9)
    np.testing.assert_allclose(np.array(summary["eval_per_category_iou"], dtype=float),
                               np.asarray(results["per_category_iou"], dtype=float), equal_nan=True)


def test_evaluate_cps_ensemble_checkpoint_equals_the_averaged_probabilities(run, capsys):
    root, members = run
    evaluate_cps = load_script("evaluate_cps")
    common = ["--dataset", "voc", "--data_root", str(root / "voc"), "--crop_size", "48"]
    summary = evaluate_cps.main(["--model", str(root / "model"), "--ensemble_checkpoint", str(root / "step_4"),
                                 *common])
    printed = capsys.readouterr().out
    assert "ensemble of 3 networks (softmax mean)" in printed
    assert summary["networks"] == "ensemble of 3 networks (softmax mean)" and summary["average"] == "softmax"
    assert summary["protocol"]["branches"] == 3
    expected = direct(members, root, mode="whole", crop_size=48)
    assert_same_results(summary, expected)

    # The same three networks as exported folders, and as one exported ensemble: the same numbers.
    folders = [str(root / "model"), str(root / "model_2"), str(root / "model_3")]
    assert_same_results(evaluate_cps.main(["--models", *folders, *common]), expected)
    assert "ensemble of 3 networks (softmax mean)" in capsys.readouterr().out
    ensemble = export_ensemble(members, root / "model_ensemble", **CARD)
    exported = evaluate_cps.main(["--model", str(ensemble), *common])
    assert "ensemble of 3 networks (softmax mean, exported ensemble)" in capsys.readouterr().out
    assert_same_results(exported, expected)

    # The default stays network 1 alone.
    single = evaluate_cps.main(["--model", str(root / "model"), *common])
    assert "network 1 only" in capsys.readouterr().out and single["networks"] == "network 1 only"
    assert_same_results(single, direct(members[:1], root, mode="whole", crop_size=48))


def test_evaluate_cps_ensemble_flags_refuse_mistakes(run, tmp_path):
    root, members = run
    evaluate_cps = load_script("evaluate_cps")
    data = ["--dataset", "voc", "--data_root", str(root / "voc")]
    model = str(root / "model")
    for argv, message in (
            (["--model", model, "--models", model], "give --model or --models, not both"),
            ([], "required: --model"),
            (["--model", model, "--ensemble_checkpoint", str(root / "step_4"), "--model2", model, "--both_branches"],
             "ensemble_checkpoint"),
            (["--models", model, model, "--ensemble_checkpoint", str(root / "step_4")], "ensemble_checkpoint")):
        with pytest.raises(UserInputError, match=message):  # one line through run_cli, not argparse's usage
            evaluate_cps.parse_args([*argv, *data])
    with pytest.raises(UserInputError, match="--ensemble_checkpoint .*folder does not exist"):
        evaluate_cps.main(["--model", model, "--ensemble_checkpoint", str(tmp_path / "nope"), *data])
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserInputError, match="no model.safetensors"):
        evaluate_cps.main(["--model", model, "--ensemble_checkpoint", str(tmp_path / "empty"), *data])
    other = tmp_path / "other"
    other.mkdir()
    save_file(tiny_network(0, "mobilenetv3_small_100", dict(enumerate(DEMO_CLASSES))).state_dict(),
              other / "model.safetensors")
    with pytest.raises(UserInputError, match="model.safetensors does not fit --model's architecture"):
        evaluate_cps.main(["--model", model, "--ensemble_checkpoint", str(other), *data])


def test_trainer_exports_the_runs_ensemble_beside_network_1(tmp_path):
    """--export_ensemble: model_ensemble/ holds every network of the run, its card says so, the pipeline
    serves it, and all_results.json has its mIoU beside network 1's."""
    import json

    from PIL import Image
    from transformers import pipeline

    from test_train import demo_root as _unused, tiny_args, train_cps  # noqa: F401
    from cps_hf.data import make_demo_voc
    from accelerate.state import AcceleratorState, GradientState

    root = tmp_path / "demo"
    make_demo_voc(root, num_train=24, num_val=4, size=(40, 52), seed=0)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    out = tmp_path / "run"
    results = train_cps.main(tiny_args(root, out, "--method", "ncps", "--num_networks", "3", "--max_train_steps", "2",
                                       "--export_ensemble"))
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    saved = json.loads((out / "all_results.json").read_text())
    assert 0 <= saved["ensemble_eval_mean_iou"] <= 1 and saved["ensemble_eval_mean_iou"] == results["ensemble_eval_mean_iou"]
    config = json.loads((out / "model_ensemble" / "config.json").read_text())
    assert config["ensemble_size"] == 3
    assert "ensemble of 3" in (out / "model_ensemble" / "README.md").read_text()
    assert "network_1 (network 1 of 3)" in (out / "model" / "README.md").read_text()
    masks = pipeline("image-segmentation", model=str(out / "model_ensemble"), subtask="semantic")(Image.new("RGB", (45, 33)))
    assert masks and all(m["mask"].size == (45, 33) for m in masks)
