"""One training step of each method on tiny conv networks, checked against a manual composition."""

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cps_hf.cutmix import box_mask
from cps_hf.losses import cross_entropy
from cps_hf.methods import MethodOutput, build_method, sigmoid_rampup
from repo_modules import load

NUM_CLASSES = 4


class TinySegmenter(nn.Module):
    """conv-BN-ReLU-conv at full resolution; records each call (batch size, grad mode, input)."""

    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, NUM_CLASSES, 1)
        )
        self.calls = []

    def forward(self, pixel_values):
        self.calls.append(SimpleNamespace(batch=pixel_values.shape[0], grad=torch.is_grad_enabled(), x=pixel_values))
        return SimpleNamespace(logits=self.body(pixel_values))


def _models():
    return [TinySegmenter(0).train(), TinySegmenter(1).train()]


def _batch(num_unlabeled_streams, labeled=2, unlabeled=2, size=12):
    g = torch.Generator().manual_seed(123)
    labels = torch.randint(0, NUM_CLASSES, (labeled, size, size), generator=g)
    labels[:, 0] = 255
    return {
        "labeled": {"pixel_values": torch.randn(labeled, 3, size, size, generator=g), "labels": labels},
        "unlabeled": [
            {"pixel_values": torch.randn(unlabeled, 3, size, size, generator=g)} for _ in range(num_unlabeled_streams)
        ],
    }


def _logits(model, x):
    return model.body(x)  # bypasses the call log; BN in train mode uses batch statistics only


def test_supervised_step_is_ce_on_the_labeled_batch():
    model = TinySegmenter(0).train()
    batch = _batch(0)
    method = build_method("supervised", cross_entropy, cps_weight=1.5)
    out = method([model], batch, step=0)
    assert isinstance(out, MethodOutput)
    logits = _logits(model, batch["labeled"]["pixel_values"])
    expected = F.cross_entropy(logits, batch["labeled"]["labels"], ignore_index=255)
    assert torch.allclose(out.loss, expected)
    assert out.logs == pytest.approx({"loss": expected.item(), "loss_sup": expected.item()})


@pytest.mark.parametrize("labeled,unlabeled", [(2, 2), (2, 3)])
def test_cps_loss_equals_the_originals_concatenated_composition(labeled, unlabeled):
    models = _models()
    batch = _batch(1, labeled, unlabeled)
    method = build_method("cps", cross_entropy, cps_weight=1.5)
    out = method(models, batch, step=0)

    x_l, y, x_u = batch["labeled"]["pixel_values"], batch["labeled"]["labels"], batch["unlabeled"][0]["pixel_values"]
    # The original: concatenate labelled and unlabelled logits, CE on the other network's argmax.
    pred_1 = torch.cat([_logits(models[0], x_l), _logits(models[0], x_u)])
    pred_2 = torch.cat([_logits(models[1], x_l), _logits(models[1], x_u)])
    cps = F.cross_entropy(pred_1, pred_2.argmax(1), ignore_index=255) + F.cross_entropy(
        pred_2, pred_1.argmax(1), ignore_index=255
    )
    sup_1 = F.cross_entropy(pred_1[:labeled], y, ignore_index=255)
    sup_2 = F.cross_entropy(pred_2[:labeled], y, ignore_index=255)
    assert torch.allclose(out.loss, sup_1 + sup_2 + 1.5 * cps, atol=1e-6)

    logs = out.logs
    assert logs["loss_sup_1"] == pytest.approx(sup_1.item(), abs=1e-6)
    assert logs["loss_sup"] == pytest.approx((sup_1 + sup_2).item(), abs=1e-6)
    assert logs["loss_cps"] == pytest.approx(cps.item(), abs=1e-6)
    # loss_cps is the pixel-weighted mean of the labelled and unlabelled terms (their average when sizes match).
    weighted = (labeled * logs["loss_cps_l"] + unlabeled * logs["loss_cps_u"]) / (labeled + unlabeled)
    assert logs["loss_cps"] == pytest.approx(weighted, abs=1e-6)
    assert logs["cps_weight"] == 1.5
    assert all(isinstance(v, float) for v in logs.values())
    for key in ("agreement_u", "agreement_u_fg", "agreement_l", "agreement_l_fg"):
        assert 0.0 <= logs[key] <= 1.0 or logs[key] != logs[key]  # a fraction, NaN only if nothing counted


def test_cps_runs_labeled_and_unlabeled_in_separate_forward_passes_and_trains_both_models():
    models = _models()
    out = build_method("cps", cross_entropy, cps_weight=1.5)(models, _batch(1, 2, 3), step=0)
    for model in models:
        assert [call.batch for call in model.calls] == [2, 3]  # original order: labelled, then unlabelled
    out.loss.backward()
    for model in models:
        for name, param in model.named_parameters():
            assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_cps_gradient_of_cps_term_reaches_each_model_only_as_student():
    models = _models()
    batch = _batch(1)
    method = build_method("cps", lambda logits, labels: logits.sum() * 0, cps_weight=1.0)
    method(models, batch, step=0).loss.backward()
    # Only the CPS term is non-zero; it is a sum of CE(student, detached argmax), so both networks get
    # gradient, and it must equal the gradient of the manual formula with explicitly detached targets.
    x = torch.cat([batch["labeled"]["pixel_values"], batch["unlabeled"][0]["pixel_values"]])
    fresh = _models()
    l1 = torch.cat([_logits(fresh[0], x[:2]), _logits(fresh[0], x[2:])])
    l2 = torch.cat([_logits(fresh[1], x[:2]), _logits(fresh[1], x[2:])])
    manual = F.cross_entropy(l1, l2.detach().argmax(1)) + F.cross_entropy(l2, l1.detach().argmax(1))
    manual.backward()
    for model, reference in zip(models, fresh):
        for p, q in zip(model.parameters(), reference.parameters()):
            assert torch.allclose(p.grad, q.grad, atol=1e-6)


def test_cps_on_unlabeled_only_ablation():
    models = _models()
    batch = _batch(1)
    out = build_method("cps", cross_entropy, cps_weight=2.0, cps_on_labeled=False)(models, batch, step=0)
    assert "loss_cps_l" not in out.logs
    assert out.logs["loss_cps"] == out.logs["loss_cps_u"]
    assert out.loss.item() == pytest.approx(out.logs["loss_sup"] + 2.0 * out.logs["loss_cps_u"], abs=1e-5)


def test_warmup_skips_unlabeled_work_and_logs_no_cps_values():
    models = _models()
    method = build_method("cps", cross_entropy, cps_weight=1.5, supervised_warmup_steps=3)
    out = method(models, _batch(1), step=2)
    assert out.logs["cps_weight"] == 0.0
    assert not any(key.startswith(("loss_cps", "agreement_u")) for key in out.logs)
    assert out.loss.item() == pytest.approx(out.logs["loss_sup"])
    assert [call.batch for call in models[0].calls] == [2]
    assert method(models, _batch(1), step=3).logs["cps_weight"] == 1.5


def test_rampup_schedule():
    method = build_method("cps", cross_entropy, cps_weight=2.0, cps_weight_rampup_steps=10, supervised_warmup_steps=5)
    assert method.cps_weight_at(4) == 0.0
    assert method.cps_weight_at(5) == pytest.approx(2.0 * torch.exp(torch.tensor(-5.0)).item())
    assert method.cps_weight_at(10) == pytest.approx(2.0 * sigmoid_rampup(5, 10))
    assert method.cps_weight_at(15) == 2.0 and method.cps_weight_at(100) == 2.0


def test_cps_cutmix_pseudo_labels_are_argmax_of_mixed_teacher_logits():
    models = _models()
    batch = _batch(2, labeled=2, unlabeled=3)
    method = build_method("cps_cutmix", cross_entropy, cps_weight=1.0, generator_seed=9)
    out = method(models, batch, step=4, rank=1, micro_step=2)

    u0, u1 = batch["unlabeled"][0]["pixel_values"], batch["unlabeled"][1]["pixel_values"]
    mask = box_mask(3, 12, 12, generator=method.generator(4, rank=1, micro_step=2))
    assert 0 < mask.mean() < 1
    mixed = u0 * (1 - mask) + u1 * mask
    with torch.no_grad():
        target_1 = (_logits(models[0], u0) * (1 - mask) + _logits(models[0], u1) * mask).argmax(1)
        target_2 = (_logits(models[1], u0) * (1 - mask) + _logits(models[1], u1) * mask).argmax(1)
    cps = F.cross_entropy(_logits(models[0], mixed), target_2) + F.cross_entropy(_logits(models[1], mixed), target_1)
    x_l, y = batch["labeled"]["pixel_values"], batch["labeled"]["labels"]
    sup = sum(F.cross_entropy(_logits(m, x_l), y, ignore_index=255) for m in models)
    assert torch.allclose(out.loss, sup + cps, atol=1e-6)
    assert out.logs["loss_cps"] == pytest.approx(cps.item(), abs=1e-6)
    assert "loss_cps_l" not in out.logs

    for model in models:
        # teachers on u0 and u1 without gradient, then the student on the mixed image, then the labelled batch
        assert [(c.batch, c.grad) for c in model.calls] == [(3, False), (3, False), (3, True), (2, True)]
        assert torch.equal(model.calls[0].x, u0) and torch.equal(model.calls[1].x, u1)
        assert torch.allclose(model.calls[2].x, mixed)
    out.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for m in models for p in m.parameters())


def test_cutmix_masks_depend_on_seed_step_and_rank_only():
    method = build_method("cps_cutmix", cross_entropy, cps_weight=1.0, generator_seed=3)
    draw = lambda *key: box_mask(4, 16, 16, generator=method.generator(*key))  # noqa: E731
    assert torch.equal(draw(10, 0, 0), draw(10, 0, 0))
    for other in [(10, 1, 0), (11, 0, 0), (10, 0, 1)]:  # another rank, step, or accumulation micro-step
        assert not torch.equal(draw(10, 0, 0), draw(*other))
    seeded_elsewhere = build_method("cps_cutmix", cross_entropy, cps_weight=1.0, generator_seed=4)
    assert not torch.equal(draw(10, 0, 0), box_mask(4, 16, 16, generator=seeded_elsewhere.generator(10, 0, 0)))


def test_bad_inputs_are_named():
    cps = build_method("cps", cross_entropy, cps_weight=1.0)
    with pytest.raises(ValueError, match="needs 2 model"):
        cps(_models()[:1], _batch(1), step=0)
    with pytest.raises(ValueError, match="unlabeled stream"):
        cps(_models(), _batch(2), step=0)
    with pytest.raises(KeyError, match="labels"):
        cps(_models(), {"labeled": {"pixel_values": torch.zeros(1, 3, 4, 4)}, "unlabeled": [{}]}, step=0)
    with pytest.raises(ValueError, match="unknown method"):
        build_method("no_such_method", cross_entropy, cps_weight=1.0)
    with pytest.raises(ValueError, match="unlabeled"):
        build_method("cps_cutmix", cross_entropy, cps_weight=1.0, cps_on_labeled=True)


def test_cps_cutmix_step_on_the_real_model():
    from cps_hf import CPSConfig, CPSForSemanticSegmentation

    labels = ["background", "a", "b"]
    config = CPSConfig(
        backbone="resnet18",
        num_labels=3,
        id2label=dict(enumerate(labels)),
        label2id={name: i for i, name in enumerate(labels)},
        aspp_channels=16,
        decoder_channels=16,
        low_level_channels=8,
    )
    models = [CPSForSemanticSegmentation(config).train() for _ in range(2)]
    batch = {
        "labeled": {"pixel_values": torch.randn(2, 3, 32, 32), "labels": torch.randint(0, 3, (2, 32, 32))},
        "unlabeled": [{"pixel_values": torch.randn(2, 3, 32, 32)} for _ in range(2)],
    }
    out = build_method("cps_cutmix", cross_entropy, cps_weight=1.0)(models, batch, step=0)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(p.grad is not None for m in models for p in m.parameters())


def test_step_efficiency_benchmark_reports_a_ratio_per_method(capsys):
    import json

    benchmark = load("benchmarks/step_efficiency.py")
    benchmark.main(["--crop", "32", "--batch", "2", "--repeats", "1", "--warmup", "0", "--num_labels", "3"])
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    ratios = summary["step_over_passes"]
    assert set(ratios) == {"cps", "cps_cutmix", "max"}
    assert ratios["max"] == max(ratios["cps"], ratios["cps_cutmix"]) > 0
    if summary["device"] == "cpu":  # the same ratio in CPU time, which a loaded machine stretches less
        assert set(summary["cpu_step_over_passes"]) == {"cps", "cps_cutmix"}
        assert all(ratio > 0 for ratio in summary["cpu_step_over_passes"].values())


def test_every_registered_method_is_a_training_flag_choice():
    import typing

    from cps_hf.methods import METHOD_NAMES
    from cps_hf.training_args import CPSTrainingConfig

    choices = typing.get_args(typing.get_type_hints(CPSTrainingConfig)["method"])
    assert set(choices) == set(METHOD_NAMES)
