"""SPS (eq. 9), CPC (eq. 7), the pseudo-label threshold and the Table 4 switches of CPS: each loss
against its equation computed independently (NumPy or by hand) on tiny conv networks or fixed
logits, the threshold at 0 bit-identical to the method without it, and 2-step end-to-end runs that
export a pipeline-ready model and resume bit-identically."""

import math
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cps_hf.cutmix import box_mask, mix
from cps_hf.losses import cross_entropy, cross_probability_consistency, cross_supervision, pseudo_labels
from cps_hf.methods import build_method
from test_methods import NUM_CLASSES, TinySegmenter, _batch, _logits, _models
from test_train import _read_log, demo_root, fresh_accelerate_state, tiny_args, train_cps  # noqa: F401

def _zero_sup(logits, labels):
    """A supervision loss of 0 (still in the graph): only the unsupervised term gives gradient."""
    return logits.sum() * 0

# What the trainer passes to every method (None: the method's default).
TRAINER_OPTIONS = dict(
    cps_weight=1.5, cps_weight_rampup_steps=0, supervised_warmup_steps=0, cps_on_labeled=None, cps_on_unlabeled=None,
    pseudo_label_threshold=0.0, ema_decay=0.99, num_networks=3, ncps_sum=False, generator_seed=0,
    background_index=0, ignore_index=255,
)


def _np(t):
    return t.detach().double().numpy()


def _np_softmax(z):  # (B, C, H, W)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _np_ce(z, labels, ignore=255, over_all_pixels=False):
    """Mean over non-ignored pixels of -log softmax(z)[label]; `over_all_pixels`: their sum divided by
    every pixel, UniMatch's `loss.sum() / (ignore_mask != 255).sum()` (no padding here)."""
    logp = np.log(_np_softmax(z))
    keep = labels != ignore
    picked = np.take_along_axis(logp, np.where(keep, labels, 0)[:, None], axis=1)[:, 0]
    return -(picked * keep).sum() / (labels.size if over_all_pixels else max(keep.sum(), 1))


def _np_cpc(z1, z2):
    """Equation 7 on one batch: mean over pixels of ||p1 - p2||^2 + ||p2 - p1||^2."""
    d = ((_np_softmax(z1) - _np_softmax(z2)) ** 2).sum(axis=1)
    return (d + d).mean()


class FixedLogits(nn.Module):
    """A 'network' whose logits are a parameter (the first B rows), so gradients are read per pixel."""

    def __init__(self, logits):
        super().__init__()
        self.logits = nn.Parameter(logits.clone())
        self.calls = []

    def forward(self, pixel_values):
        self.calls.append(pixel_values.shape[0])
        return SimpleNamespace(logits=self.logits[: pixel_values.shape[0]])


# ---------------------------------------------------------------------------------------------
# CPC: equation 7
# ---------------------------------------------------------------------------------------------


def test_cpc_loss_by_hand_on_one_pixel():
    # p1 = (1/2, 1/2), p2 = (3/4, 1/4): ||p1 - p2||^2 = 1/16 + 1/16 = 1/8, both directions: 1/4.
    z1 = torch.tensor([0.0, 0.0]).reshape(1, 2, 1, 1)
    z2 = torch.tensor([math.log(3.0), 0.0]).reshape(1, 2, 1, 1)
    assert cross_probability_consistency(z1, z2).item() == pytest.approx(0.25, abs=1e-7)
    assert cross_probability_consistency(z1, z1).item() == 0.0


def test_cpc_loss_equals_equation_7_and_its_gradients():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(2, 5, 3, 4, generator=g), torch.randn(2, 5, 3, 4, generator=g)
    value = cross_probability_consistency(z1, z2)
    assert value.item() == pytest.approx(_np_cpc(_np(z1), _np(z2)), rel=1e-6)
    assert cross_probability_consistency(z1, z2, stop_gradient=False).item() == pytest.approx(value.item(), rel=1e-6)

    # Default: each network is trained only as the prediction, the other's p being its target:
    # d/dp1 = 2 (p1 - p2) / N, by the chain rule through the softmax.
    a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    cross_probability_consistency(a, b).backward()
    p1, p2 = z1.softmax(1), z2.softmax(1)
    n = z1[:, 0].numel()
    for grad, p, q in ((a.grad, p1, p2), (b.grad, p2, p1)):
        dl_dp = 2 * (p - q) / n
        expected = p * (dl_dp - (dl_dp * p).sum(1, keepdim=True))  # softmax Jacobian-vector product
        assert torch.allclose(grad, expected, atol=1e-7)
    # Without the stop-gradients every gradient doubles (= the default with lambda doubled).
    a2, b2 = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    cross_probability_consistency(a2, b2, stop_gradient=False).backward()
    assert torch.allclose(a2.grad, 2 * a.grad, atol=1e-7) and torch.allclose(b2.grad, 2 * b.grad, atol=1e-7)


@pytest.mark.parametrize("labeled,unlabeled", [(2, 2), (2, 3)])
def test_cpc_step_is_sup_plus_lambda_times_pixel_weighted_eq7(labeled, unlabeled):
    models = _models()
    batch = _batch(1, labeled, unlabeled)
    out = build_method("cpc", cross_entropy, **{**TRAINER_OPTIONS, "cps_weight": 2.0})(models, batch, step=0)
    for model in models:
        assert [call.batch for call in model.calls] == [labeled, unlabeled]  # cps's order, separate passes

    x_l, y, x_u = batch["labeled"]["pixel_values"], batch["labeled"]["labels"], batch["unlabeled"][0]["pixel_values"]
    zl = [_np(_logits(m, x_l)) for m in models]
    zu = [_np(_logits(m, x_u)) for m in models]
    sup = sum(_np_ce(z, y.numpy()) for z in zl)
    cpc_l, cpc_u = _np_cpc(*zl), _np_cpc(*zu)
    cpc = (labeled * cpc_l + unlabeled * cpc_u) / (labeled + unlabeled)  # eq. 7's mean over D = D^l u D^u
    assert out.loss.item() == pytest.approx(sup + 2.0 * cpc, rel=1e-5)
    logs = out.logs
    assert logs["loss_cpc_l"] == pytest.approx(cpc_l, rel=1e-5)
    assert logs["loss_cpc_u"] == pytest.approx(cpc_u, rel=1e-5)
    assert logs["loss_cpc"] == pytest.approx(cpc, rel=1e-5)
    assert logs["loss_sup"] == pytest.approx(sup, rel=1e-5) and logs["cps_weight"] == 2.0
    assert {"agreement_l", "agreement_u", "loss_sup_1", "loss_sup_2"} <= set(logs)
    assert not any(key.startswith("loss_cps") for key in logs)


def test_cpc_gradient_reaches_each_network_only_as_the_prediction():
    models = _models()
    batch = _batch(1)
    method = build_method("cpc", _zero_sup, cps_weight=1.0)
    method(models, batch, step=0).loss.backward()
    fresh = _models()
    x_l, x_u = batch["labeled"]["pixel_values"], batch["unlabeled"][0]["pixel_values"]
    manual = 0
    for x in (x_l, x_u):  # equal sizes: the pixel-weighted mean is the plain mean of the two terms
        p1, p2 = _logits(fresh[0], x).softmax(1), _logits(fresh[1], x).softmax(1)
        term = ((p1 - p2.detach()) ** 2).sum(1).mean() + ((p2 - p1.detach()) ** 2).sum(1).mean()
        manual = manual + term / 2
    manual.backward()
    for model, reference in zip(models, fresh):
        for p, q in zip(model.parameters(), reference.parameters()):
            assert p.grad.abs().sum() > 0
            assert torch.allclose(p.grad, q.grad, atol=1e-7)


def test_cpc_table_4_switches_and_refusals():
    batch = _batch(1)
    only_u = build_method("cpc", cross_entropy, cps_weight=1.0, cps_on_labeled=False)(_models(), batch, step=0)
    assert "loss_cpc_l" not in only_u.logs and only_u.logs["loss_cpc"] == only_u.logs["loss_cpc_u"]

    method = build_method("cpc", cross_entropy, **{**TRAINER_OPTIONS, "cps_on_unlabeled": False, "cps_weight": 1.0})
    assert method.num_unlabeled_streams == 0  # the loop loads no unlabeled batch
    models = _models()
    out = method(models, {"labeled": batch["labeled"], "unlabeled": []}, step=0)
    assert [call.batch for call in models[0].calls] == [2]
    assert "loss_cpc_u" not in out.logs and "agreement_u" not in out.logs
    assert out.logs["loss_cpc"] == out.logs["loss_cpc_l"]
    assert out.loss.item() == pytest.approx(out.logs["loss_sup"] + out.logs["loss_cpc_l"], rel=1e-6)

    with pytest.raises(ValueError, match="both be off"):
        build_method("cpc", cross_entropy, cps_on_labeled=False, cps_on_unlabeled=False)
    with pytest.raises(ValueError, match="pseudo_label_threshold"):
        build_method("cpc", cross_entropy, pseudo_label_threshold=0.5)


@pytest.mark.parametrize("name", ["cpc", "sps", "cps"])
def test_warmup_skips_the_unlabeled_work(name):
    models = _models() if name != "sps" else _models()[:1]
    method = build_method(name, cross_entropy, cps_weight=1.5, supervised_warmup_steps=2)
    out = method(models, _batch(1), step=1)
    assert out.logs["cps_weight"] == 0.0 and out.loss.item() == pytest.approx(out.logs["loss_sup"])
    assert not any(key.startswith(("loss_cp", "loss_sps", "agreement_u", "pseudo_kept")) for key in out.logs)
    assert [call.batch for call in models[0].calls] == [2]


# ---------------------------------------------------------------------------------------------
# SPS: equation 9
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("labeled,unlabeled", [(2, 2), (2, 3)])
def test_sps_step_is_sup_plus_lambda_times_ce_on_own_argmax(labeled, unlabeled):
    model = TinySegmenter(0).train()
    batch = _batch(1, labeled, unlabeled)
    method = build_method("sps", cross_entropy, **TRAINER_OPTIONS)
    assert method.num_models == 1 and method.trained_count == 1
    out = method([model], batch, step=0)
    assert [call.batch for call in model.calls] == [labeled, unlabeled]

    x_l, y, x_u = batch["labeled"]["pixel_values"], batch["labeled"]["labels"], batch["unlabeled"][0]["pixel_values"]
    zl, zu = _np(_logits(model, x_l)), _np(_logits(model, x_u))
    sup = _np_ce(zl, y.numpy())
    sps_l, sps_u = _np_ce(zl, zl.argmax(1)), _np_ce(zu, zu.argmax(1))
    sps = (labeled * sps_l + unlabeled * sps_u) / (labeled + unlabeled)
    assert out.loss.item() == pytest.approx(sup + 1.5 * sps, rel=1e-5)
    assert out.logs["loss_sps_l"] == pytest.approx(sps_l, rel=1e-5)
    assert out.logs["loss_sps_u"] == pytest.approx(sps_u, rel=1e-5)
    assert out.logs["loss_sps"] == pytest.approx(sps, rel=1e-5)
    assert out.logs["loss_sup"] == pytest.approx(sup, rel=1e-5)
    assert not any(key.startswith("pseudo_kept") for key in out.logs)  # threshold 0


def test_sps_gradient_is_softmax_minus_onehot_of_its_own_argmax():
    """The entropy-minimisation-like pull: d CE(z, argmax z) / dz = (softmax(z) - onehot(argmax z)) / N."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, NUM_CLASSES, 3, 3, generator=g)
    net = FixedLogits(logits)
    batch = {"labeled": {"pixel_values": torch.zeros(2, 3, 3, 3), "labels": torch.zeros(2, 3, 3, dtype=torch.long)},
             "unlabeled": [{"pixel_values": torch.zeros(2, 3, 3, 3)}]}
    out = build_method("sps", _zero_sup, cps_weight=1.0, cps_on_labeled=False)([net], batch, step=0)
    out.loss.backward()
    p = logits.softmax(1)
    onehot = F.one_hot(logits.argmax(1), NUM_CLASSES).permute(0, 3, 1, 2).float()
    assert torch.allclose(net.logits.grad, (p - onehot) / logits[:, 0].numel(), atol=1e-7)


def test_sps_table_4_style_switches():
    batch = _batch(1)
    only_l = build_method("sps", cross_entropy, cps_weight=1.0, cps_on_unlabeled=False)
    assert only_l.num_unlabeled_streams == 0
    model = TinySegmenter(0).train()
    out = only_l([model], {"labeled": batch["labeled"], "unlabeled": []}, step=0)
    assert [call.batch for call in model.calls] == [2] and out.logs["loss_sps"] == out.logs["loss_sps_l"]
    only_u = build_method("sps", cross_entropy, cps_weight=1.0, cps_on_labeled=False)([TinySegmenter(0).train()],
                                                                                       batch, step=0)
    assert "loss_sps_l" not in only_u.logs and only_u.logs["loss_sps"] == only_u.logs["loss_sps_u"]
    with pytest.raises(ValueError, match="both be off"):
        build_method("sps", cross_entropy, cps_on_labeled=False, cps_on_unlabeled=False)
    with pytest.raises(ValueError, match="unlabeled"):
        build_method("sps_cutmix", cross_entropy, cps_on_labeled=True)
    with pytest.raises(ValueError, match="cps_on_unlabeled=False"):
        build_method("sps_cutmix", cross_entropy, cps_on_unlabeled=False)
    with pytest.raises(ValueError, match="needs 1 model"):
        build_method("sps", cross_entropy)(_models(), batch, step=0)


def test_sps_cutmix_supervises_the_mixed_prediction_with_its_own_mixed_argmax():
    model = TinySegmenter(0).train()
    batch = _batch(2, labeled=2, unlabeled=3)
    method = build_method("sps_cutmix", cross_entropy, **{**TRAINER_OPTIONS, "cps_weight": 1.0, "generator_seed": 9})
    assert method.num_models == 1 and method.num_unlabeled_streams == 2
    out = method([model], batch, step=4, rank=1, micro_step=2)

    u0, u1 = batch["unlabeled"][0]["pixel_values"], batch["unlabeled"][1]["pixel_values"]
    mask = box_mask(3, 12, 12, generator=method.generator(4, rank=1, micro_step=2))
    assert 0 < mask.mean() < 1
    # teacher passes without gradient on the two sources, then the student on the mixed image, then labeled
    assert [(c.batch, c.grad) for c in model.calls] == [(3, False), (3, False), (3, True), (2, True)]
    assert torch.equal(model.calls[0].x, u0) and torch.equal(model.calls[1].x, u1)
    mixed = u0 * (1 - mask) + u1 * mask
    assert torch.allclose(model.calls[2].x, mixed)
    target = (_np(_logits(model, u0)) * (1 - _np(mask)) + _np(_logits(model, u1)) * _np(mask)).argmax(1)
    sps = _np_ce(_np(_logits(model, mixed)), target)
    x_l, y = batch["labeled"]["pixel_values"], batch["labeled"]["labels"]
    sup = _np_ce(_np(_logits(model, x_l)), y.numpy())
    assert out.loss.item() == pytest.approx(sup + sps, rel=1e-5)
    assert out.logs["loss_sps"] == out.logs["loss_sps_u"] == pytest.approx(sps, rel=1e-5)
    out.loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_sps_cutmix_back_propagates_only_through_the_mixed_image():
    model = TinySegmenter(0).train()
    batch = _batch(2)
    method = build_method("sps_cutmix", _zero_sup, cps_weight=1.0, generator_seed=1)
    method([model], batch, step=0).loss.backward()
    fresh = TinySegmenter(0).train()
    u0, u1 = batch["unlabeled"][0]["pixel_values"], batch["unlabeled"][1]["pixel_values"]
    mask = box_mask(2, 12, 12, generator=method.generator(0))
    with torch.no_grad():
        target = mix(_logits(fresh, u0), _logits(fresh, u1), mask).argmax(1)
    F.cross_entropy(_logits(fresh, mix(u0, u1, mask)), target).backward()
    for p, q in zip(model.parameters(), fresh.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# The pseudo-label threshold
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("normalize", ["valid", "kept"])
def test_threshold_ignores_low_confidence_pixels_by_hand(normalize):
    # Pixel A: logits (2, 0, 0, 0), confidence e^2 / (e^2 + 3) = 0.711 (kept at tau 0.5);
    # pixel B: logits (0.1, 0, 0, 0), confidence 0.269 (ignored).
    logits = torch.zeros(1, 4, 1, 2)
    logits[0, 0, 0, 0], logits[0, 0, 0, 1] = 2.0, 0.1
    net = FixedLogits(logits)
    batch = {"labeled": {"pixel_values": torch.zeros(1, 3, 1, 2), "labels": torch.zeros(1, 1, 2, dtype=torch.long)},
             "unlabeled": [{"pixel_values": torch.zeros(1, 3, 1, 2)}]}
    options = {} if normalize == "valid" else {"pseudo_label_normalize": "kept"}  # valid: the default
    method = build_method("sps", _zero_sup, cps_weight=1.0, cps_on_labeled=False, pseudo_label_threshold=0.5, **options)
    out = method([net], batch, step=0)
    ce_at_a = math.log(1 + 3 * math.exp(-2))
    # UniMatch: (CE at A + 0 at B) / 2 valid pixels; kept: CE at A / 1 kept pixel (a mean over kept pixels)
    assert out.logs["loss_sps_u"] == pytest.approx(ce_at_a / 2 if normalize == "valid" else ce_at_a, rel=1e-6)
    assert out.logs["pseudo_kept_u"] == 0.5
    out.loss.backward()
    assert torch.all(net.logits.grad[0, :, 0, 1] == 0)  # the ignored pixel gets no gradient
    assert net.logits.grad[0, :, 0, 0].abs().sum() > 0
    # All pixels below the threshold: no target left, loss 0 (not NaN), nothing kept.
    none_kept = build_method("sps", _zero_sup, cps_weight=1.0, cps_on_labeled=False,
                             pseudo_label_threshold=0.9, **options)([FixedLogits(logits)], batch, step=0)
    assert none_kept.logs["loss_sps_u"] == 0.0 and none_kept.logs["pseudo_kept_u"] == 0.0


def _confidence(logits):
    return logits.detach().softmax(1).amax(1)


@pytest.mark.parametrize("normalize", ["valid", "kept"])
def test_cps_threshold_masks_each_networks_targets_and_logs_kept_fractions(normalize):
    models = _models()
    batch = _batch(1, 2, 3)
    x_l, x_u = batch["labeled"]["pixel_values"], batch["unlabeled"][0]["pixel_values"]
    zu = [_logits(m, x_u).detach() for m in models]
    zl = [_logits(m, x_l).detach() for m in models]
    tau = float(torch.cat([_confidence(z).flatten() for z in zu + zl]).median())  # some kept, some not
    options = {**TRAINER_OPTIONS, "pseudo_label_threshold": tau, "pseudo_label_normalize": normalize}
    out = build_method("cps", cross_entropy, **options)(models, batch, step=0)
    over_all = normalize == "valid"

    def masked_targets(z):
        return z.argmax(1).masked_fill(_confidence(z) < tau, 255)

    expected = {}
    for part, z, n in (("u", zu, 3), ("l", zl, 2)):
        t1, t2 = masked_targets(z[0]), masked_targets(z[1])
        expected[f"loss_cps_{part}"] = (_np_ce(_np(z[0]), t2.numpy(), over_all_pixels=over_all)
                                        + _np_ce(_np(z[1]), t1.numpy(), over_all_pixels=over_all))
        kept = [(_confidence(zk) >= tau).float().mean().item() for zk in z]
        assert 0 < min(kept) and max(kept) < 1
        expected[f"pseudo_kept_{part}_1"], expected[f"pseudo_kept_{part}_2"] = kept
        expected[f"pseudo_kept_{part}"] = sum(kept) / 2
    for key, value in expected.items():
        assert out.logs[key] == pytest.approx(value, rel=1e-5), key
    cps = (2 * expected["loss_cps_l"] + 3 * expected["loss_cps_u"]) / 5
    assert out.logs["loss_cps"] == pytest.approx(cps, rel=1e-5)
    # The agreement logs compare the raw argmaxes: the same as without a threshold.
    plain = build_method("cps", cross_entropy, **TRAINER_OPTIONS)(_models(), batch, step=0)
    for key in ("agreement_l", "agreement_l_fg", "agreement_u", "agreement_u_fg"):
        assert out.logs[key] == plain.logs[key], key


def test_cps_cutmix_threshold_masks_the_mixed_teacher_targets():
    models = _models()
    batch = _batch(2, 2, 3)
    u0, u1 = batch["unlabeled"][0]["pixel_values"], batch["unlabeled"][1]["pixel_values"]
    probe = build_method("cps_cutmix", cross_entropy, cps_weight=1.0, generator_seed=5)
    mask = box_mask(3, 12, 12, generator=probe.generator(2))
    teacher = [mix(_logits(m, u0), _logits(m, u1), mask).detach() for m in models]
    tau = float(torch.cat([_confidence(z).flatten() for z in teacher]).median())
    out = build_method("cps_cutmix", cross_entropy, cps_weight=1.0, generator_seed=5,
                       pseudo_label_threshold=tau)(models, batch, step=2)
    targets = [z.argmax(1).masked_fill(_confidence(z) < tau, 255) for z in teacher]
    mixed = mix(u0, u1, mask)
    cps = (_np_ce(_np(_logits(models[0], mixed)), targets[1].numpy(), over_all_pixels=True)
           + _np_ce(_np(_logits(models[1], mixed)), targets[0].numpy(), over_all_pixels=True))  # the default: valid
    assert out.logs["loss_cps"] == pytest.approx(cps, rel=1e-5)
    kept = [(_confidence(z) >= tau).float().mean().item() for z in teacher]
    assert out.logs["pseudo_kept_u"] == pytest.approx(sum(kept) / 2, rel=1e-6)
    assert out.logs["pseudo_kept_u_1"] == pytest.approx(kept[0], rel=1e-6)


def test_threshold_is_refused_outside_0_1():
    with pytest.raises(ValueError, match="pseudo_label_threshold"):
        build_method("sps", cross_entropy, pseudo_label_threshold=1.0)


# ---------------------------------------------------------------------------------------------
# tau = 0 is the reviewed CPS, bit for bit
# ---------------------------------------------------------------------------------------------


def _reference_cps(models, batch, weight, on_labeled=True):
    """CPSMethod.compute as reviewed (before the threshold and cps_on_unlabeled), same operations."""
    x_l, y, x_u = batch["labeled"]["pixel_values"], batch["labeled"]["labels"], batch["unlabeled"][0]["pixel_values"]
    logits_l, logits_u = [], []
    for model in models:
        logits_l.append(model(pixel_values=x_l).logits)
        logits_u.append(model(pixel_values=x_u).logits)
    sup = [cross_entropy(lg, y) for lg in logits_l]
    loss = sum(sup[1:], sup[0])
    pred_l = [pseudo_labels(lg) for lg in logits_l]
    pred_u = [pseudo_labels(lg) for lg in logits_u]
    loss_u = cross_supervision(*logits_u, *pred_u, 255)
    if on_labeled:
        loss_l = cross_supervision(*logits_l, *pred_l, 255)
        n_l, n_u = logits_l[0][:, 0].numel(), logits_u[0][:, 0].numel()
        loss_cps = (n_l * loss_l + n_u * loss_u) / (n_l + n_u)
    else:
        loss_cps = loss_u
    return loss + weight * loss_cps


def _reference_cps_cutmix(models, batch, weight, generator):
    x_l, y = batch["labeled"]["pixel_values"], batch["labeled"]["labels"]
    u0, u1 = batch["unlabeled"][0]["pixel_values"], batch["unlabeled"][1]["pixel_values"]
    mask = box_mask(u0.shape[0], u0.shape[2], u0.shape[3], generator=generator)
    with torch.no_grad():
        targets = [pseudo_labels(mix(m(pixel_values=u0).logits, m(pixel_values=u1).logits, mask)) for m in models]
    mixed = mix(u0, u1, mask.to(u0.dtype))
    students = [m(pixel_values=mixed).logits for m in models]
    loss_cps = cross_supervision(*students, *targets, 255)
    sup = [cross_entropy(m(pixel_values=x_l).logits, y) for m in models]
    return sum(sup[1:], sup[0]) + weight * loss_cps


@pytest.mark.parametrize("case", ["cps", "cps_unlabeled_only", "cps_cutmix"])
def test_threshold_zero_is_bit_identical_to_the_reviewed_methods(case):
    name = "cps_cutmix" if case == "cps_cutmix" else "cps"
    options = {**TRAINER_OPTIONS, "generator_seed": 4}
    if case == "cps_unlabeled_only":
        options["cps_on_labeled"] = False
    method = build_method(name, cross_entropy, **options)
    batch = _batch(method.num_unlabeled_streams, 2, 3)
    models, reference = _models(), _models()
    out = method(models, batch, step=3, rank=0, micro_step=1)
    if name == "cps":
        expected = _reference_cps(reference, batch, 1.5, on_labeled=case == "cps")
    else:
        expected = _reference_cps_cutmix(reference, batch, 1.5, method.generator(3, 0, 1))
    assert torch.equal(out.loss, expected)
    out.loss.backward()
    expected.backward()
    for model, ref in zip(models, reference):
        for p, q in zip(model.parameters(), ref.parameters()):
            assert torch.equal(p.grad, q.grad)
    assert not any(key.startswith("pseudo_kept") for key in out.logs)


# ---------------------------------------------------------------------------------------------
# Table 4 switches of cps
# ---------------------------------------------------------------------------------------------


def test_cps_labeled_only_skips_the_unlabeled_batch():
    method = build_method("cps", cross_entropy, **{**TRAINER_OPTIONS, "cps_on_unlabeled": False, "cps_weight": 2.0})
    assert method.num_unlabeled_streams == 0
    batch = _batch(0)
    models = _models()
    out = method(models, batch, step=0)
    for model in models:
        assert [call.batch for call in model.calls] == [2]
    x_l, y = batch["labeled"]["pixel_values"], batch["labeled"]["labels"]
    z = [_logits(m, x_l) for m in models]
    cps_l = F.cross_entropy(z[0], z[1].argmax(1)) + F.cross_entropy(z[1], z[0].argmax(1))
    sup = sum(F.cross_entropy(zk, y, ignore_index=255) for zk in z)
    assert torch.allclose(out.loss, sup + 2.0 * cps_l, atol=1e-6)
    assert out.logs["loss_cps"] == out.logs["loss_cps_l"] == pytest.approx(cps_l.item(), abs=1e-6)
    assert not any(key.startswith(("loss_cps_u", "agreement_u")) for key in out.logs)
    with pytest.raises(ValueError, match="unlabeled stream"):
        method(_models(), _batch(1), step=0)  # no unlabeled batch is expected any more


def test_cps_switches_refuse_both_off_and_cutmix_without_unlabeled():
    with pytest.raises(ValueError, match="both be off"):
        build_method("cps", cross_entropy, cps_on_labeled=False, cps_on_unlabeled=False)
    with pytest.raises(ValueError, match="cps_on_unlabeled=False"):
        build_method("cps_cutmix", cross_entropy, cps_on_unlabeled=False)
    assert build_method("cps", cross_entropy, **TRAINER_OPTIONS).num_unlabeled_streams == 1  # defaults: both on


# ---------------------------------------------------------------------------------------------
# End to end: 2 steps through scripts/train_cps.py, export, resume
# ---------------------------------------------------------------------------------------------


def _check_export(out):
    from PIL import Image
    from transformers import pipeline

    assert (out / "model" / "model.safetensors").is_file() and (out / "model" / "config.json").is_file()
    segmenter = pipeline("image-segmentation", model=str(out / "model"), subtask="semantic")
    image = Image.new("RGB", (45, 33), (120, 30, 200))
    masks = segmenter(image)
    assert masks and all(m["mask"].size == image.size for m in masks)


@pytest.mark.slow
@pytest.mark.parametrize("method,keys", [
    ("sps", ("loss_sps", "loss_sps_l", "loss_sps_u")),
    ("sps_cutmix", ("loss_sps", "loss_sps_u")),
    ("cpc", ("loss_cpc", "loss_cpc_l", "loss_cpc_u", "agreement_u")),
])
def test_new_method_trains_exports_and_resumes_bit_identically(demo_root, tmp_path, monkeypatch, method, keys):
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")  # CPU kernels: bit-identical reruns (see test_train)
    common = ("--method", method, "--max_train_steps", "2", "--checkpointing_steps", "1")
    straight = tmp_path / "straight"
    results = train_cps.main(tiny_args(demo_root, straight, *common))
    assert results["final_step"] == 2
    records = [r for r in _read_log(straight) if "loss" in r]
    assert [r["step"] for r in records] == [1, 2]
    for record in records:
        for key in ("loss_sup", "cps_weight", *keys):
            assert key in record, key
        term = record[keys[0]]
        assert record["loss"] == pytest.approx(record["loss_sup"] + record["cps_weight"] * term, rel=1e-5)
    _check_export(straight)

    # Crash after step 1: a copy of the run without what came later, resumed from its latest checkpoint.
    resumed_dir = tmp_path / "resumed"
    shutil.copytree(straight, resumed_dir)
    for later in ("step_2", "model", "all_results.json"):
        path = resumed_dir / later
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    resumed = train_cps.main(tiny_args(demo_root, resumed_dir, *common, "--resume_from_checkpoint", "latest"))
    assert resumed["final_step"] == 2
    assert resumed["parameter_fingerprint"] == results["parameter_fingerprint"]
    assert [r["step"] for r in _read_log(resumed_dir) if "loss" in r] == [1, 2]


@pytest.mark.slow
@pytest.mark.parametrize("method,extra,present,absent", [
    ("cps", ("--cps_on_unlabeled", "false"), ("loss_cps_l",), ("loss_cps_u", "agreement_u")),
    ("cps_cutmix", ("--pseudo_label_threshold", "0.4"), ("pseudo_kept_u", "pseudo_kept_u_1"), ()),
])
def test_cps_switch_and_threshold_through_the_trainer(demo_root, tmp_path, method, extra, present, absent):
    out = tmp_path / method
    results = train_cps.main(tiny_args(demo_root, out, "--method", method, "--max_train_steps", "2", *extra))
    assert results["final_step"] == 2 and (out / "model" / "model.safetensors").is_file()
    records = [r for r in _read_log(out) if "loss" in r]
    assert [r["step"] for r in records] == [1, 2]
    for record in records:
        assert all(key in record for key in present) and not any(key in record for key in absent)


def test_the_kept_fraction_of_each_class_is_logged_over_both_networks():
    """Which classes a threshold starves: of the pixels each network's argmax gives a class, the share
    kept, summed over the two networks (issue: thresholds erase classes silently)."""
    models = _models()
    batch = _batch(1, 2, 3)
    x_u = batch["unlabeled"][0]["pixel_values"]
    zu = [_logits(m, x_u).detach() for m in models]
    tau = float(torch.cat([_confidence(z).flatten() for z in zu]).median())
    names = [f"c{k}" for k in range(zu[0].shape[1])]
    out = build_method("cps", cross_entropy, **{**TRAINER_OPTIONS, "pseudo_label_threshold": tau,
                                                "cps_on_labeled": False, "class_names": names})(models, batch, step=0)
    for c, name in enumerate(names):
        predicted = sum(int((z.argmax(1) == c).sum()) for z in zu)
        kept = sum(int(((z.argmax(1) == c) & (_confidence(z) >= tau)).sum()) for z in zu)
        if predicted:
            assert out.logs[f"pseudo_kept_u/{name}"] == pytest.approx(kept / predicted), name
        else:
            assert f"pseudo_kept_u/{name}" not in out.logs  # a class nobody predicted has no ratio
    assert any(key.startswith("pseudo_kept_u/") for key in out.logs)
    plain = build_method("cps", cross_entropy, **{**TRAINER_OPTIONS, "cps_on_labeled": False})(_models(), batch, step=0)
    assert not any(key.startswith("pseudo_kept") for key in plain.logs)
