"""The encoder recipe options (ConvNeXt / DINOv2 fine-tuning): AdamW, a head LR multiplier,
layer-wise LR decay, warm-up, a frozen backbone, drop path and extra timm kwargs. At their
defaults nothing changes (test_optim.py pins the paper's groups and schedule)."""

import json
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors.torch import load_file

from cps_hf import CPSConfig
from cps_hf.errors import ConfigError
from cps_hf.optim import build_optimizer, decay_parameter_names, learning_rates, poly_schedule
from cps_hf.training import apply_backbone_options, build_networks, model_config_from_args
from cps_hf.training_args import parse_args
from test_train import _read_log, demo_root, fresh_accelerate_state, tiny_args, train_cps  # noqa: F401 (fixtures)

CLASSES = ["background", "red", "green"]


def _networks(backbone="mobilenetv3_small_100", count=2, **kwargs):
    config = CPSConfig(backbone=backbone, num_labels=3, aspp_channels=16, decoder_channels=16,
                       low_level_channels=8, **kwargs)
    return build_networks(config, count)


def _without_params(group):
    return {key: value for key, value in group.items() if key != "params"}


def test_defaults_give_the_original_groups():
    networks = _networks()
    plain = build_optimizer(networks, lr=0.0025, weight_decay=1e-4)
    explicit = build_optimizer(networks, lr=0.0025, weight_decay=1e-4, optimizer="sgd", head_lr_multiplier=1.0,
                               layer_decay=None, betas=(0.9, 0.999))
    assert [g["name"] for g in explicit.param_groups] == ["model0_decay", "model0_no_decay", "model1_decay",
                                                          "model1_no_decay"]
    assert explicit.state_dict() == plain.state_dict()  # same layout, so old checkpoints resume
    for a, b in zip(plain.param_groups, explicit.param_groups, strict=True):
        assert _without_params(a) == _without_params(b) and "lr_scale" not in b
        assert all(x is y for x, y in zip(a["params"], b["params"], strict=True))
    assert learning_rates(explicit) == {"lr": 0.0025}


def test_adamw_with_head_multiplier_groups_and_schedule():
    networks = _networks()
    lr, total, warmup = 1e-4, 10, 3
    optimizer = build_optimizer(networks, lr=lr, weight_decay=0.05, optimizer="adamw", head_lr_multiplier=40,
                                betas=(0.9, 0.95))
    assert isinstance(optimizer, torch.optim.AdamW)
    parts = ["backbone_decay", "backbone_no_decay", "head_decay", "head_no_decay"]
    assert [g["name"] for g in optimizer.param_groups] == [f"model{i}_{p}" for i in (0, 1) for p in parts]
    for index, network in enumerate(networks):
        decay = decay_parameter_names(network)
        names = {id(p): n for n, p in network.named_parameters()}
        groups = optimizer.param_groups[4 * index:4 * index + 4]
        grouped = [names[id(p)] for g in groups for p in g["params"]]
        assert sorted(grouped) == sorted(names.values())  # each parameter exactly once
        for group in groups:
            member_names = [names[id(p)] for p in group["params"]]
            in_backbone = group["name"].split("_")[1] == "backbone"
            assert all(n.startswith("backbone.") == in_backbone for n in member_names)
            decays = not group["name"].endswith("_no_decay")
            assert all((n in decay) == decays for n in member_names)
            assert group["weight_decay"] == (0.05 if decays else 0.0)
            assert group["lr"] == pytest.approx(lr * (1 if in_backbone else 40), rel=1e-15)
            assert group["betas"] == (0.9, 0.95)

    scheduler = poly_schedule(optimizer, total_steps=total, power=0.9, warmup_steps=warmup)
    initial = [group["initial_lr"] for group in optimizer.param_groups]  # the groups' lrs above
    for t in range(total + 2):
        factor = t / warmup if t < warmup else (max(0.0, 1 - (t - warmup) / (total - warmup)) ** 0.9)
        for group, start in zip(optimizer.param_groups, initial):
            assert group["lr"] == pytest.approx(start * factor, rel=1e-12, abs=1e-20), (t, group["name"])
        rates = learning_rates(optimizer)
        assert rates["lr"] == pytest.approx(lr * factor, rel=1e-12, abs=1e-20)
        assert rates["lr_head"] == pytest.approx(40 * lr * factor, rel=1e-12, abs=1e-20)
        optimizer.step()  # no gradients: nothing moves, but the scheduler sees an optimizer step
        scheduler.step()


def test_warmup_zero_is_the_schedule_without_warmup():
    a = build_optimizer(_networks(count=1), lr=0.01)
    b = build_optimizer(_networks(count=1), lr=0.01)
    sa, sb = poly_schedule(a, 20), poly_schedule(b, 20, warmup_steps=0)
    for _ in range(22):
        assert [g["lr"] for g in a.param_groups] == [g["lr"] for g in b.param_groups]
        a.step(), b.step(), sa.step(), sb.step()
    with pytest.raises(ValueError, match="warmup_steps"):
        poly_schedule(a, 5, warmup_steps=5)


def test_frozen_backbone_is_not_optimised():
    (network,) = _networks(count=1)
    network.freeze_backbone()
    optimizer = build_optimizer([network], lr=0.01, head_lr_multiplier=10)
    assert [g["name"] for g in optimizer.param_groups] == ["model0_head_decay", "model0_head_no_decay"]
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert in_optimizer == {id(p) for n, p in network.named_parameters() if not n.startswith("backbone.")}
    assert learning_rates(optimizer) == {"lr": pytest.approx(0.01), "lr_head": pytest.approx(0.1)}


def test_layer_decay_on_a_vit_follows_timm_layers():
    kwargs = {"depth": 4, "embed_dim": 48, "num_heads": 2, "img_size": 56}
    (network,) = _networks("vit_small_patch14_dinov2", count=1, backbone_kwargs=kwargs, output_stride=None)
    optimizer = build_optimizer([network], lr=1e-3, optimizer="adamw", head_lr_multiplier=10, layer_decay=0.5)
    lr_of = {n: g["lr"] for g in optimizer.param_groups for p in g["params"]
             for n, q in network.named_parameters() if q is p}
    # timm's ViT layers: 0 = embeddings, 1..4 = blocks (the last block shares the final norm's layer 4)
    assert lr_of["backbone.cls_token"] == pytest.approx(1e-3 * 0.5 ** 4)
    for block in range(4):
        assert lr_of[f"backbone.blocks.{block}.attn.qkv.weight"] == pytest.approx(1e-3 * 0.5 ** (3 - block))
    assert all(lr == pytest.approx(1e-2) for n, lr in lr_of.items() if not n.startswith("backbone."))
    names = [g["name"] for g in optimizer.param_groups]
    assert names[:2] == ["model0_backbone_layer0_decay", "model0_backbone_layer0_no_decay"]
    assert len(names) == 2 * 5 + 2  # decay / no_decay for each of the 5 encoder layers, then the head's
    assert names[-2:] == ["model0_head_decay", "model0_head_no_decay"]
    no_decay = {n for g in optimizer.param_groups if g["weight_decay"] == 0 for p in g["params"]
                for n, q in network.named_parameters() if q is p}
    assert {"backbone.cls_token", "backbone.pos_embed", "backbone.blocks.0.ls1.gamma"} <= no_decay


def test_layer_decay_on_a_features_only_convnext():
    """FeatureListNet renames `stages.0` to `stages_0`: timm's own wrapper naming maps it back."""
    kwargs = {"depths": [1, 1, 1, 1], "dims": [8, 16, 32, 64]}
    (network,) = _networks("convnext_tiny", count=1, backbone_kwargs=kwargs)
    optimizer = build_optimizer([network], lr=1.0, layer_decay=0.9)
    lr_of = {n: g["lr"] for g in optimizer.param_groups for p in g["params"]
             for n, q in network.named_parameters() if q is p}
    backbone = [lr_of[n] for n, _ in network.named_parameters() if n.startswith("backbone.")]
    assert backbone == sorted(backbone) and backbone[0] < backbone[-1] <= 1.0  # stem lowest, deeper higher
    assert lr_of["backbone.stem_0.weight"] < lr_of["backbone.stages_3.blocks.0.conv_dw.weight"]
    with pytest.raises(ValueError, match="CPS networks"):
        build_optimizer([torch.nn.Linear(2, 2)], lr=1.0, layer_decay=0.9)


def test_recipe_flags_are_checked_by_name():
    def refused(*flags):
        with pytest.raises(ConfigError) as error:
            parse_args(["--dataset", "voc", *flags])
        return str(error.value)

    assert "--layer_decay" in refused("--layer_decay", "0")
    assert "--layer_decay" in refused("--layer_decay", "1.5")
    assert "--head_lr_multiplier" in refused("--head_lr_multiplier", "0")
    assert "--warmup_steps" in refused("--warmup_steps", "-1")
    assert "--warmup_steps" in refused("--warmup_steps", "5", "--max_train_steps", "5")
    assert "--adam_betas" in refused("--adam_betas", "0.9", "1.0")
    assert "--drop_path_rate" in refused("--drop_path_rate", "1")
    message = refused("--backbone_kwargs", "{depth: 2}")
    assert message.startswith("--backbone_kwargs is not valid JSON") and "{depth: 2}" in message
    assert "JSON object" in refused("--backbone_kwargs", "[1, 2]")
    assert "not both" in refused("--backbone_kwargs", '{"drop_path_rate": 0.2}', "--drop_path_rate", "0.1")


def test_backbone_kwargs_and_drop_path_reach_the_timm_model(tmp_path):
    default = model_config_from_args(parse_args(["--backbone", "resnet18"]), CLASSES)
    assert default.backbone_kwargs is None  # configs of runs without the options are unchanged

    args = parse_args(["--backbone", "resnet18", "--drop_path_rate", "0.1", "--backbone_kwargs", '{"drop_block_rate": 0.0}'])
    config = model_config_from_args(args, CLASSES)
    assert config.backbone_kwargs == {"drop_block_rate": 0.0, "drop_path_rate": 0.1}
    (network,) = build_networks(config, 1)
    assert network.backbone.layer4[-1].drop_path.drop_prob == pytest.approx(0.1)  # timm's linear rule, last block

    preset = tmp_path / "vit.yaml"  # a YAML mapping works as well as a JSON string
    preset.write_text("backbone: vit_small_patch14_dinov2\nbackbone_kwargs: {depth: 2, embed_dim: 48, num_heads: 2}\n"
                      "vit_feature_indices: [0, 1]\n")
    config = model_config_from_args(parse_args(["--config", str(preset)]), CLASSES)
    assert config.backbone_kwargs == {"depth": 2, "embed_dim": 48, "num_heads": 2}
    assert list(config.vit_feature_indices) == [0, 1]


def test_backbone_options_call_the_model():
    calls = []

    class Network:
        def freeze_backbone(self):
            calls.append("freeze")

        def set_backbone_gradient_checkpointing(self, enable):
            calls.append(("checkpointing", enable))

    apply_backbone_options([Network(), Network()], SimpleNamespace(freeze_backbone=True, gradient_checkpointing=True))
    assert calls == ["freeze", ("checkpointing", True)] * 2
    calls.clear()
    apply_backbone_options([Network()], SimpleNamespace(freeze_backbone=False, gradient_checkpointing=False))
    assert calls == []


def test_batch_of_one_and_a_too_long_warmup_are_refused(demo_root, tmp_path):
    out = tmp_path / "one"
    with pytest.raises(ConfigError, match="image-pooling BatchNorm cannot train on one image"):
        train_cps.main(tiny_args(demo_root, out, "--per_device_train_batch_size", "1", "--max_train_steps", "1"))
    assert not (out / "training_config.yaml").exists()
    with pytest.raises(ConfigError, match="--warmup_steps 1000 must be below the run's"):
        train_cps.main(tiny_args(demo_root, tmp_path / "warm", "--num_train_epochs", "1", "--warmup_steps", "1000"))


def test_adamw_head_multiplier_warmup_drop_path_run(demo_root, tmp_path):
    out = tmp_path / "adamw"
    results = train_cps.main(tiny_args(demo_root, out, "--method", "cps", "--max_train_steps", "2",
                                       "--optimizer", "adamw", "--head_lr_multiplier", "10", "--warmup_steps", "1",
                                       "--drop_path_rate", "0.1"))
    assert results["final_step"] == 2
    steps = [r for r in _read_log(out) if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    assert steps[0]["lr"] == 0.0 and steps[0]["lr_head"] == 0.0  # warm-up from 0 (transformers' convention)
    assert steps[1]["lr"] == pytest.approx(0.01) and steps[1]["lr_head"] == pytest.approx(0.1)
    used = yaml.safe_load((out / "training_config.yaml").read_text())
    assert {k: used[k] for k in ("optimizer", "head_lr_multiplier", "warmup_steps", "drop_path_rate", "adam_betas",
                                 "layer_decay", "backbone_kwargs", "freeze_backbone", "vit_feature_indices",
                                 "gradient_checkpointing")} == {
        "optimizer": "adamw", "head_lr_multiplier": 10.0, "warmup_steps": 1, "drop_path_rate": 0.1,
        "adam_betas": [0.9, 0.999], "layer_decay": None, "backbone_kwargs": None, "freeze_backbone": False,
        "vit_feature_indices": None, "gradient_checkpointing": False}
    assert json.loads((out / "model" / "config.json").read_text())["backbone_kwargs"] == {"drop_path_rate": 0.1}
    counts = json.loads((out / "all_results.json").read_text())["num_parameters"]
    assert counts["trainable"] == counts["backbone"] + counts["head"] > counts["head"] > 0


def test_frozen_backbone_run_keeps_the_initial_backbone(demo_root, tmp_path):
    out = tmp_path / "frozen"
    train_cps.main(tiny_args(demo_root, out, "--method", "cps", "--max_train_steps", "2", "--freeze_backbone"))
    trained = load_file(out / "model" / "model.safetensors")
    # Network 1 as the run built it: same config, same seed (pretrained none), before any step.
    (initial,) = build_networks(CPSConfig.from_pretrained(out / "model"), 1, seed=0)
    start = initial.state_dict()
    backbone = [k for k in start if k.startswith("backbone.")]
    assert any("running_mean" in k for k in backbone)  # BN statistics are part of the check
    for key in backbone:
        assert torch.equal(trained[key], start[key]), key
    head = [k for k in start if k.startswith("decode_head.") and k.endswith(".weight")]
    assert any(not torch.equal(trained[k], start[k]) for k in head)  # the head did train
    counts = json.loads((out / "all_results.json").read_text())["num_parameters"]
    assert counts["trainable"] == counts["head"] and counts["backbone"] > 0


def test_tiny_vit_run_with_layer_decay_and_checkpointing(demo_root, tmp_path):
    """The DINOv2-style recipe end to end on a tiny random ViT given by --backbone_kwargs JSON."""
    out = tmp_path / "vit"
    train_cps.main(tiny_args(demo_root, out, "--method", "cps", "--max_train_steps", "2",
                             "--backbone", "vit_small_patch14_dinov2", "--output_stride", "none",
                             "--backbone_kwargs", '{"depth": 2, "embed_dim": 48, "num_heads": 2, "img_size": 28}',
                             "--optimizer", "adamw", "--head_lr_multiplier", "10", "--layer_decay", "0.8",
                             "--gradient_checkpointing"))
    steps = [r for r in _read_log(out) if "loss" in r]
    assert steps[0]["lr"] == pytest.approx(0.01) and steps[0]["lr_head"] == pytest.approx(0.1)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in steps)
    config = json.loads((out / "model" / "config.json").read_text())
    assert config["backbone_kwargs"] == {"depth": 2, "embed_dim": 48, "num_heads": 2, "img_size": 28}
