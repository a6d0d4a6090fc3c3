"""Mean teacher and its CutMix form (cps_hf/methods/mean_teacher.py): the loss against its equation on
tiny conv networks, the EMA teacher, and end-to-end runs of scripts/train_cps.py (export, resume, DDP)."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cps_hf.cutmix import box_mask
from cps_hf.losses import cross_entropy
from cps_hf.methods import MeanTeacherCutMixMethod, MeanTeacherMethod, build_method

from test_methods import NUM_CLASSES, TinySegmenter, _logits  # noqa: E402  (the tiny networks of the CPS tests)

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "train_cps.py"


def _batch(num_unlabeled_streams, labeled=2, unlabeled=2, size=12):
    g = torch.Generator().manual_seed(123)
    labels = torch.randint(0, NUM_CLASSES, (labeled, size, size), generator=g)
    labels[:, 0] = 255
    return {
        "labeled": {"pixel_values": torch.randn(labeled, 3, size, size, generator=g), "labels": labels},
        "unlabeled": [
            {"pixel_values": 2 * torch.randn(unlabeled, 3, size, size, generator=g)}
            for _ in range(num_unlabeled_streams)
        ],
    }


def _pair(method):
    """A student and a teacher that starts as its copy (the loop's init_networks call)."""
    student, teacher = TinySegmenter(0).train(), TinySegmenter(1).train()
    method.init_networks([student, teacher])
    return student, teacher


def _perturb(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.add_(0.3 * torch.randn(tensor.shape, generator=g))
        model.body[1].running_var.abs_()
        model.body[1].num_batches_tracked.fill_(seed)


def _mt_probability(student_logits, teacher_logits, mask=None):
    per_pixel = ((student_logits.softmax(1) - teacher_logits.softmax(1)) ** 2).sum(1)
    if mask is not None:
        per_pixel = per_pixel * mask
    return per_pixel.mean()


# ---- the teacher ------------------------------------------------------------------------------

NO_RAMP = dict(cps_weight_rampup_epochs=0)  # mean_teacher ramps lambda over 3 epochs unless told otherwise


def test_contract_names_and_reference_defaults():
    method = build_method("mean_teacher", cross_entropy, cps_weight=1.0, ema_decay=0.9, cps_on_labeled=None,
                          cps_on_unlabeled=None, num_networks=3, ncps_sum=False, generator_seed=0)
    assert isinstance(method, MeanTeacherMethod) and method.ema_decay == 0.9
    assert (method.num_models, method.trained_count, method.num_unlabeled_streams) == (2, 1, 1)
    assert method.names() == ("student", "teacher") and method.export_index() == 0
    assert method.export_index("teacher") == 1
    # PixelSSL's MT (behind the paper's MT numbers): MSE of logits, 3-epoch sigmoid ramp-up, EMA warm-up,
    # parameters-only EMA, no input noise, no threshold, the student exported
    assert (method.consistency, method.cps_weight_rampup_epochs, method.ema_warmup, method.ema_buffers,
            method.student_noise_std, method.pseudo_label_threshold, method.freeze_bn) == (
        "logit_mse", 3.0, True, False, 0.0, 0.0, False)
    # CutMix-Seg's CutMix scripts: softmax distance, conf 0.97 as a fraction, one 50% box, fixed EMA over
    # the whole state, --freeze_bn, no ramp-up, the teacher evaluated and exported
    cutmix = build_method("mean_teacher_cutmix", cross_entropy, cps_weight=1.0)
    assert isinstance(cutmix, MeanTeacherCutMixMethod) and cutmix.num_unlabeled_streams == 2
    assert (cutmix.consistency, cutmix.pseudo_label_threshold, cutmix.confidence_weighting, cutmix.cutmix_num_boxes,
            cutmix.cutmix_area_range, cutmix.ema_warmup, cutmix.ema_buffers, cutmix.freeze_bn,
            cutmix.cps_weight_rampup_epochs, cutmix.ema_decay, cutmix.student_noise_std) == (
        "probability", 0.97, "fraction", 1, (0.5, 0.5), False, True, True, 0.0, 0.99, 0.0)
    assert cutmix.export_index() == 1 and cutmix.names()[cutmix.export_index()] == "teacher"
    # every one of them is a flag away
    other = build_method("mean_teacher_cutmix", cross_entropy, consistency="logit_mse", pseudo_label_threshold=0.0,
                         cutmix_num_boxes=3, cutmix_area_range=[0.25, 0.5], freeze_bn=False, ema_warmup=True,
                         ema_buffers=False, cps_weight_rampup_epochs=2)
    assert (other.consistency, other.pseudo_label_threshold, other.cutmix_num_boxes, other.cutmix_area_range,
            other.freeze_bn, other.ema_warmup, other.ema_buffers, other.cps_weight_rampup_epochs) == (
        "logit_mse", 0.0, 3, (0.25, 0.5), False, True, False, 2.0)
    with pytest.raises(ValueError, match="unlabeled images only"):
        build_method("mean_teacher", cross_entropy, cps_on_labeled=True)
    with pytest.raises(ValueError, match="cps_on_unlabeled=False"):
        build_method("mean_teacher_cutmix", cross_entropy, cps_on_unlabeled=False)
    with pytest.raises(ValueError, match="consistency"):
        MeanTeacherMethod(cross_entropy, consistency="mse")
    with pytest.raises(ValueError, match="confidence_weighting"):
        MeanTeacherMethod(cross_entropy, confidence_weighting="batch")
    # --mt_consistency reaches the method through the trainer's options (others ignore it)
    assert build_method("mean_teacher", cross_entropy, consistency="pseudo_label").consistency == "pseudo_label"
    assert build_method("cps", cross_entropy, consistency="pseudo_label").name == "cps"


def test_rampup_is_three_epochs_of_pixelssls_sigmoid_once_the_epoch_length_is_known():
    method = build_method("mean_teacher", cross_entropy, cps_weight=2.0)
    with pytest.raises(RuntimeError, match="set_steps_per_epoch"):
        method.cps_weight_at(0)
    method.set_steps_per_epoch(10)  # the trainer's call: 3 epochs = 30 steps
    assert method.cps_weight_rampup_steps == 30
    for step in (0, 12, 30, 45):
        t = min(step / 30, 1.0)
        assert method.cps_weight_at(step) == pytest.approx(2.0 * math.exp(-5 * (1 - t) ** 2))
    steps = build_method("mean_teacher", cross_entropy, cps_weight=2.0, cps_weight_rampup_steps=7)
    assert steps.cps_weight_rampup_epochs == 0 and steps.cps_weight_at(7) == 2.0  # explicit steps replace it
    with pytest.raises(ValueError, match="once"):
        build_method("mean_teacher", cross_entropy, cps_weight_rampup_steps=7, cps_weight_rampup_epochs=1)


def test_init_networks_copies_the_student_parameters_and_buffers():
    method = build_method("mean_teacher", cross_entropy)
    student, teacher = TinySegmenter(0), TinySegmenter(1)
    _perturb(student, 5)  # non-default running statistics and count
    method.init_networks([student, teacher])
    s, t = student.state_dict(), teacher.state_dict()
    assert s.keys() == t.keys() and all(torch.equal(s[k], t[k]) for k in s)
    assert t["body.1.num_batches_tracked"].item() == 5
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(student.parameters(), teacher.parameters()))


def _perturbed_pair(method):
    student, teacher = TinySegmenter(0), TinySegmenter(1)
    _perturb(student, 1)
    _perturb(teacher, 2)
    return student, teacher, {k: v.clone() for k, v in student.state_dict().items()}, \
        {k: v.clone() for k, v in teacher.state_dict().items()}


def test_cutmix_seg_ema_averages_the_whole_state_with_a_fixed_decay():
    decay = 0.9
    method = build_method("mean_teacher", cross_entropy, ema_decay=decay, ema_warmup=False, ema_buffers=True)
    student, teacher, before_s, before_t = _perturbed_pair(method)
    method.after_optimizer_step([student, teacher], step=0)
    after_t = teacher.state_dict()
    for key, value in before_t.items():
        if value.is_floating_point():  # parameters and BN running_mean / running_var
            assert torch.allclose(after_t[key], decay * value + (1 - decay) * before_s[key], atol=1e-7), key
        else:  # num_batches_tracked: copied
            assert torch.equal(after_t[key], before_s[key])
    assert all(torch.equal(v, before_s[k]) for k, v in student.state_dict().items())  # the student is untouched
    # one concrete number: 0.9 * t + 0.1 * s
    t0, s0 = before_t["body.0.weight"].flatten()[0].item(), before_s["body.0.weight"].flatten()[0].item()
    assert after_t["body.0.weight"].flatten()[0].item() == pytest.approx(0.9 * t0 + 0.1 * s0, abs=1e-6)
    assert build_method("mean_teacher_cutmix", cross_entropy).ema_decay_at(0) == 0.99  # its default: fixed


@pytest.mark.parametrize("step,decay", [(0, 0.0), (1, 0.5), (3, 0.75), (9, 0.9), (500, 0.9)])
def test_pixelssl_ema_warms_up_and_averages_parameters_only(step, decay):
    """PixelSSL: decay min(1 - 1/(t + 1), ema_decay) over the parameters; the teacher's BN statistics
    are its own (its train-mode forwards move them), never the student's."""
    method = build_method("mean_teacher", cross_entropy, ema_decay=0.9)
    assert method.ema_decay_at(step) == pytest.approx(decay)
    student, teacher, before_s, before_t = _perturbed_pair(method)
    method.after_optimizer_step([student, teacher], step=step)
    parameters = {name for name, _ in teacher.named_parameters()}
    after_t = teacher.state_dict()
    for key, value in before_t.items():
        if key in parameters:
            assert torch.allclose(after_t[key], decay * value + (1 - decay) * before_s[key], atol=1e-7), key
        else:  # running_mean, running_var, num_batches_tracked: the teacher's own
            assert torch.equal(after_t[key], value), key


# ---- the loss ---------------------------------------------------------------------------------


@pytest.mark.parametrize("consistency", ["logit_mse", "probability", "pseudo_label"])
def test_loss_equals_its_equation(consistency):
    method = MeanTeacherMethod(cross_entropy, cps_weight=1.5, consistency=consistency, **NO_RAMP)
    student, teacher = _pair(method)
    _perturb(teacher, 3)  # a teacher that differs from the student, as after some EMA steps
    batch = _batch(1)
    out = method([student, teacher], batch, step=0)

    x_l, y, u = batch["labeled"]["pixel_values"], batch["labeled"]["labels"], batch["unlabeled"][0]["pixel_values"]
    sup = F.cross_entropy(_logits(student, x_l), y, ignore_index=255)
    s_u, t_u = _logits(student, u), _logits(teacher, u).detach()
    if consistency == "logit_mse":
        mt = F.mse_loss(s_u, t_u)  # PixelSSL's nn.MSELoss(): a mean over batch, classes and pixels
    elif consistency == "probability":
        mt = _mt_probability(s_u, t_u)
    else:
        mt = F.cross_entropy(s_u, t_u.argmax(1))
    assert torch.allclose(out.loss, sup + 1.5 * mt, atol=1e-6)
    agreement = (s_u.argmax(1) == t_u.argmax(1)).float().mean().item()
    assert out.logs["loss_sup"] == pytest.approx(sup.item(), rel=1e-5)
    assert out.logs["loss_mt"] == pytest.approx(mt.item(), rel=1e-5)
    assert out.logs["loss"] == pytest.approx(out.loss.item(), rel=1e-6)
    assert out.logs["cps_weight"] == 1.5 and out.logs["agreement_u"] == pytest.approx(agreement)
    assert out.logs["ema_decay"] == 0.0  # PixelSSL's warm-up: the first update copies the student
    assert "agreement_u_fg" in out.logs and "pseudo_kept_u" not in out.logs
    # forwards: student labeled (grad), teacher unlabeled (no grad), student unlabeled (grad), same input
    assert [c.grad for c in student.calls] == [True, True] and [c.grad for c in teacher.calls] == [False]
    assert torch.equal(student.calls[1].x, teacher.calls[0].x)  # no noise by default


@pytest.mark.parametrize("normalize", ["valid", "kept"])
@pytest.mark.parametrize("consistency", ["logit_mse", "probability", "pseudo_label"])
def test_threshold_per_pixel_masks_unconfident_teacher_pixels(consistency, normalize):
    threshold = 0.5
    method = MeanTeacherMethod(cross_entropy, cps_weight=1.0, consistency=consistency, pseudo_label_threshold=threshold,
                               pseudo_label_normalize=normalize, **NO_RAMP)
    assert method.confidence_weighting == "pixel"  # mean_teacher's default
    student, teacher = _pair(method)
    _perturb(teacher, 3)
    batch = _batch(1)
    out = method([student, teacher], batch, step=0)

    u = batch["unlabeled"][0]["pixel_values"]
    s_u, t_u = _logits(student, u), _logits(teacher, u).detach()
    confident = (t_u.softmax(1).amax(1) >= threshold).float()
    assert 0 < confident.mean() < 1  # the test exercises both sides of the threshold
    if consistency == "logit_mse":
        per_pixel = ((s_u - t_u) ** 2).mean(1)
    elif consistency == "probability":
        per_pixel = ((s_u.softmax(1) - t_u.softmax(1)) ** 2).sum(1)
    else:
        per_pixel = F.cross_entropy(s_u, t_u.argmax(1), reduction="none")
    # valid: masked pixels count as zeros in a mean over all pixels (French's conf_per_pixel, UniMatch's
    # normalisation); kept: a mean over the confident pixels
    mt = (per_pixel * confident).sum() / (confident.numel() if normalize == "valid" else confident.sum())
    sup = F.cross_entropy(_logits(student, batch["labeled"]["pixel_values"]), batch["labeled"]["labels"],
                          ignore_index=255)
    assert out.logs["loss_mt"] == pytest.approx(mt.item(), rel=1e-5)
    assert torch.allclose(out.loss, sup + mt, atol=1e-6)
    assert out.logs["pseudo_kept_u"] == pytest.approx(confident.mean().item())


def test_no_gradient_reaches_the_teacher():
    method = build_method("mean_teacher", cross_entropy, cps_weight=1.0, **NO_RAMP)
    student, teacher = _pair(method)  # teacher parameters still require grad: only no_grad protects them
    out = method([student, teacher], _batch(1), step=0)
    out.loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    cutmix = build_method("mean_teacher_cutmix", cross_entropy, cps_weight=1.0, freeze_bn=False,
                          pseudo_label_threshold=0.0)
    student, teacher = _pair(cutmix)
    cutmix([student, teacher], _batch(2), step=0).loss.backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(not c.grad for c in teacher.calls) and len(teacher.calls) == 2


def test_student_view_is_the_teachers_plus_seeded_noise():
    method = build_method("mean_teacher", cross_entropy, cps_weight=1.0, generator_seed=7, student_noise_std=0.1,
                          **NO_RAMP)
    batch = _batch(1)
    u = batch["unlabeled"][0]["pixel_values"]

    def student_input(step, rank=0, micro_step=0):
        student, teacher = _pair(method)
        method([student, teacher], batch, step=step, rank=rank, micro_step=micro_step)
        assert torch.equal(teacher.calls[0].x, u)  # the teacher sees the stream's view itself
        return student.calls[1].x

    x1 = student_input(3)
    noise = (x1 - u) / method.student_noise_std
    assert noise.std().item() == pytest.approx(1.0, abs=0.1) and noise.mean().abs() < 0.1
    assert torch.equal(student_input(3), x1)  # (seed, step, rank, micro_step) decide the noise
    assert not torch.allclose(student_input(4), x1)
    assert not torch.allclose(student_input(3, rank=1), x1)
    assert not torch.allclose(student_input(3, micro_step=1), x1)


def test_warmup_skips_the_teacher():
    method = build_method("mean_teacher", cross_entropy, cps_weight=1.0, supervised_warmup_steps=2, **NO_RAMP)
    student, teacher = _pair(method)
    out = method([student, teacher], _batch(1), step=1)
    assert teacher.calls == [] and len(student.calls) == 1
    assert out.logs["cps_weight"] == 0.0 and "loss_mt" not in out.logs
    assert out.logs["loss"] == pytest.approx(out.logs["loss_sup"])


def _cutmix_reference(method, student, teacher, batch, step, rank):
    """The mixed images, the student's logits on them and the mixed teacher logits, written out."""
    u0, u1 = batch["unlabeled"][0]["pixel_values"], batch["unlabeled"][1]["pixel_values"]
    mask = box_mask(2, 12, 12, generator=method.generator(step, rank, 0), prop_range=method.cutmix_area_range,
                    n_boxes=method.cutmix_num_boxes)
    assert 0 < mask.mean() < 1
    teacher_mixed = (_logits(teacher, u0) * (1 - mask) + _logits(teacher, u1) * mask).detach()
    mixed = u0 * (1 - mask) + u1 * mask
    return mask, mixed, _logits(student, mixed), teacher_mixed


@pytest.mark.parametrize("consistency", ["logit_mse", "probability", "pseudo_label"])
def test_cutmix_loss_equals_its_equation(consistency):
    method = MeanTeacherCutMixMethod(cross_entropy, cps_weight=2.0, consistency=consistency, generator_seed=3,
                                     pseudo_label_threshold=0.0, freeze_bn=False)
    student, teacher = _pair(method)
    _perturb(teacher, 4)
    batch = _batch(2)
    out = method([student, teacher], batch, step=5, rank=1, micro_step=0)

    mask, mixed, s_mixed, teacher_mixed = _cutmix_reference(method, student, teacher, batch, 5, 1)
    # CutMix-Seg's one box of 50% (rounded to pixels), not CPS's three boxes
    assert mask.mean(dim=(1, 2, 3)).tolist() == pytest.approx([0.5, 0.5], abs=0.06)
    assert torch.equal(student.calls[1].x, mixed)  # the student sees the mixed images, no noise
    if consistency == "logit_mse":
        mt = F.mse_loss(s_mixed, teacher_mixed)
    elif consistency == "probability":
        mt = _mt_probability(s_mixed, teacher_mixed)
    else:
        mt = F.cross_entropy(s_mixed, teacher_mixed.argmax(1))
    sup = F.cross_entropy(_logits(student, batch["labeled"]["pixel_values"]), batch["labeled"]["labels"],
                          ignore_index=255)
    assert torch.allclose(out.loss, sup + 2.0 * mt, atol=1e-6)
    assert out.logs["loss_mt"] == pytest.approx(mt.item(), rel=1e-5)
    agreement = (s_mixed.argmax(1) == teacher_mixed.argmax(1)).float().mean().item()
    assert out.logs["agreement_u"] == pytest.approx(agreement)


def test_cutmix_seg_weights_the_loss_by_the_fraction_of_confident_teacher_pixels():
    """CutMix-Seg with conf_per_pixel off: mean over all pixels of the softmax distance, times the fraction
    (over the whole batch) of pixels whose mixed-teacher confidence reaches the threshold, a scalar."""
    probe = MeanTeacherCutMixMethod(cross_entropy, generator_seed=3, freeze_bn=False)
    student, teacher = _pair(probe)
    _perturb(teacher, 4)
    batch = _batch(2)
    _, _, s_mixed, teacher_mixed = _cutmix_reference(probe, student, teacher, batch, 5, 0)
    confidence = teacher_mixed.softmax(1).amax(1)
    threshold = float(confidence.flatten().median())  # about half the pixels pass (0.97 on trained networks)
    method = MeanTeacherCutMixMethod(cross_entropy, cps_weight=1.0, generator_seed=3, freeze_bn=False,
                                     pseudo_label_threshold=threshold)
    out = method([student, teacher], batch, step=5)
    fraction = (confidence >= threshold).float().mean()
    assert 0.3 < fraction < 0.7
    mt = _mt_probability(s_mixed, teacher_mixed) * fraction
    assert out.logs["loss_mt"] == pytest.approx(mt.item(), rel=1e-5)
    assert out.logs["pseudo_kept_u"] == pytest.approx(fraction.item())
    out.loss.backward()  # every pixel still gets a gradient (scaled), unlike the per-pixel mask
    assert all(p.grad is not None for p in student.parameters())


def test_freeze_bn_keeps_the_encoder_batchnorms_in_eval_mode_and_training_their_weights():
    from tiny_models import tiny_config

    from cps_hf.modeling_cps import CPSForSemanticSegmentation

    student, teacher = CPSForSemanticSegmentation(tiny_config()), CPSForSemanticSegmentation(tiny_config())
    build_method("mean_teacher_cutmix", cross_entropy).init_networks([student, teacher])
    for network in (student, teacher):
        network.train()
        encoder_bn = [m for m in network.backbone.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        head_bn = [m for m in network.decode_head.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
        assert encoder_bn and head_bn
        assert not any(m.training for m in encoder_bn) and all(m.training for m in head_bn)
        assert all(p.requires_grad for m in encoder_bn for p in m.parameters())  # affine weights still train
    before = [m.running_mean.clone() for m in student.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    student(pixel_values=torch.randn(2, 3, 32, 32)).logits.sum().backward()
    after = [m.running_mean for m in student.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert all(torch.equal(a, b) for a, b in zip(before, after))
    plain = CPSForSemanticSegmentation(tiny_config())
    build_method("mean_teacher", cross_entropy).init_networks([plain, CPSForSemanticSegmentation(tiny_config())])
    assert all(m.training for m in plain.train().backbone.modules())


def test_sps_makes_its_pseudo_labels_in_a_pass_of_their_own_when_the_network_is_stochastic():
    """eq. 9's two streams are one pass for a deterministic network and two with dropout (they differ)."""
    from cps_hf.methods.base import has_stochastic_layers

    batch = _batch(1)
    plain = build_method("sps", cross_entropy, cps_weight=1.0)
    model = TinySegmenter(0).train()
    plain.init_networks([model])
    plain([model], batch, step=0)
    assert not plain.stochastic_passes and [c.grad for c in model.calls] == [True, True]

    noisy = TinySegmenter(0).train()
    noisy.body.insert(3, torch.nn.Dropout2d(0.5))
    assert has_stochastic_layers(noisy) and not has_stochastic_layers(TinySegmenter(0))
    method = build_method("sps", cross_entropy, cps_weight=1.0)
    method.init_networks([noisy])
    method([noisy], batch, step=0)
    assert method.stochastic_passes
    # labeled (grad), unlabeled (grad), then the pseudo-label passes: unlabeled and labeled without grad
    assert [(c.batch, c.grad) for c in noisy.calls] == [(2, True), (2, True), (2, False), (2, False)]
    assert torch.equal(noisy.calls[2].x, batch["unlabeled"][0]["pixel_values"])
    assert torch.equal(noisy.calls[3].x, batch["labeled"]["pixel_values"])


# ---- end to end through scripts/train_cps.py ----------------------------------------------------


from test_train import demo_root, fresh_accelerate_state, tiny_args, train_cps  # noqa: E402,F401  (shared fixtures)


def _read_log(output_dir):
    return [json.loads(line) for line in (Path(output_dir) / "log.jsonl").read_text().splitlines()]


def _card_row(folder):
    return next(line for line in (Path(folder) / "README.md").read_text().splitlines()
                if line.startswith("| Exported network |"))


def _teacher_file(step_dir):
    """Where a checkpoint keeps the teacher: accelerate custom state (streams, progress, teacher)."""
    found = []
    for path in sorted(Path(step_dir).glob("custom_checkpoint_*.pkl")):
        state = torch.load(path, weights_only=False)
        if isinstance(state, dict) and any(str(k).endswith("num_batches_tracked") for k in state):
            found.append(path)
    assert len(found) == 1, f"expected one network state among {step_dir}'s custom checkpoints, found {found}"
    return found[0]


def _follower_state(step_dir):
    return torch.load(_teacher_file(step_dir), weights_only=False)


@pytest.mark.parametrize("method,exported_name", [("mean_teacher", "student (network 1 of 2)"),
                                                   ("mean_teacher_cutmix", "teacher (network 2 of 2)")])
def test_tiny_run_trains_and_exports_the_reference_network(demo_root, tmp_path, method, exported_name):
    """PixelSSL's MT exports the student; CutMix-Seg evaluates and exports the teacher, and freezes the
    encoder's BN statistics (--freeze_bn), which therefore never move."""
    from safetensors.torch import load_file
    from transformers import pipeline
    from PIL import Image

    out = tmp_path / method
    results = train_cps.main(tiny_args(demo_root, out, "--method", method, "--max_train_steps", "3",
                                       "--checkpointing_steps", "3"))
    assert results["final_step"] == 3 and 0.0 <= results["eval_mean_iou"] <= 1.0
    steps = [r for r in _read_log(out) if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for record in steps:
        for key in ("loss", "loss_sup", "loss_mt", "cps_weight", "agreement_u", "ema_decay"):
            assert key in record, key
        assert "loss_sup_2" not in record  # one supervised network
        assert record["loss"] == pytest.approx(record["loss_sup"] + record["cps_weight"] * record["loss_mt"], rel=1e-5)
    if method == "mean_teacher":  # lambda ramps up over 3 epochs; the EMA decay warms up
        assert 0 < steps[0]["cps_weight"] < steps[-1]["cps_weight"]
        assert [r["ema_decay"] for r in steps] == pytest.approx([1 - 1 / 1, 1 - 1 / 2, 1 - 1 / 3])
    else:
        assert [r["ema_decay"] for r in steps] == [0.99] * 3 and len({r["cps_weight"] for r in steps}) == 1
        assert all(0 <= r["pseudo_kept_u"] <= 1 for r in steps)
    assert exported_name in _card_row(out / "model")

    # The checkpoint holds the trained student (model.safetensors) and the teacher (custom state),
    # and after 3 EMA steps they differ; model/ is the exported one.
    step_dir = out / "step_3"
    student = load_file(step_dir / "model.safetensors")
    teacher = {k: v.cpu() for k, v in _follower_state(step_dir).items()}
    exported = load_file(out / "model" / "model.safetensors")
    assert exported.keys() == student.keys()
    expected = student if exported_name.startswith("student") else teacher
    assert all(torch.equal(exported[k], expected[k]) for k in student)
    assert any(not torch.equal(teacher[k], student[k]) for k in student if k.endswith("weight"))
    encoder_means = [k for k in student if k.startswith("backbone.") and k.endswith("running_mean")]
    frozen = all(torch.equal(student[k], torch.zeros_like(student[k])) for k in encoder_means)
    assert encoder_means and frozen == (method == "mean_teacher_cutmix")  # random init: statistics start at 0

    segmenter = pipeline("image-segmentation", model=str(out / "model"), subtask="semantic")
    image = Image.new("RGB", (45, 33), (120, 30, 200))
    assert segmenter(image)


def test_export_network_teacher_exports_the_teacher(demo_root, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "teacher"
    train_cps.main(tiny_args(demo_root, out, "--method", "mean_teacher", "--max_train_steps", "2",
                             "--checkpointing_steps", "2", "--export_network", "teacher"))
    assert "teacher (network 2 of 2)" in _card_row(out / "model")
    exported = load_file(out / "model" / "model.safetensors")
    teacher = _follower_state(out / "step_2")
    student = load_file(out / "step_2" / "model.safetensors")
    assert exported.keys() == student.keys()
    assert all(torch.equal(exported[k], teacher[k].cpu()) for k in exported)
    assert not all(torch.equal(exported[k], student[k]) for k in exported)


@pytest.mark.parametrize("method", ["mean_teacher", "mean_teacher_cutmix"])
def test_resume_mid_run_matches_an_uninterrupted_run(demo_root, tmp_path, monkeypatch, method):
    """Run 4 steps (checkpoint at 2), then drop what came after step 2 and resume: at step 4 the
    student and the teacher (exported here, and in the fingerprint of every network) equal those of
    the uninterrupted run, bit for bit."""
    from safetensors.torch import load_file

    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    common = ("--method", method, "--max_train_steps", "4", "--checkpointing_steps", "2",
              "--export_network", "teacher")
    out = tmp_path / "run"
    straight = train_cps.main(tiny_args(demo_root, out, *common))
    straight_teacher = load_file(out / "model" / "model.safetensors")
    assert (out / "step_2" / "checkpoint_complete.json").is_file()
    shutil.rmtree(out / "step_4")
    shutil.rmtree(out / "model")
    resumed = train_cps.main(tiny_args(demo_root, out, *common, "--resume_from_checkpoint", "latest"))
    assert resumed["final_step"] == 4
    assert resumed["parameter_fingerprint"] == straight["parameter_fingerprint"]
    assert [r["step"] for r in _read_log(out) if "loss" in r] == [1, 2, 3, 4]
    resumed_teacher = load_file(out / "model" / "model.safetensors")
    assert straight_teacher.keys() == resumed_teacher.keys()
    assert all(torch.equal(straight_teacher[k], resumed_teacher[k]) for k in straight_teacher)


def test_resume_without_the_teacher_state_would_differ(demo_root, tmp_path, monkeypatch):
    """The check above has teeth: resuming with the saved teacher replaced by the student differs."""
    from safetensors.torch import load_file

    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    common = ("--method", "mean_teacher", "--max_train_steps", "3", "--checkpointing_steps", "2")
    out = tmp_path / "run"
    straight = train_cps.main(tiny_args(demo_root, out, *common))
    shutil.rmtree(out / "model")
    step_dir = out / "step_2"
    student = load_file(step_dir / "model.safetensors")
    teacher_file = _teacher_file(step_dir)
    state = torch.load(teacher_file, weights_only=False)
    assert state.keys() == student.keys()
    torch.save({k: student[k].clone() for k in state}, teacher_file)
    resumed = train_cps.main(tiny_args(demo_root, out, *common, "--resume_from_checkpoint", "latest"))
    assert resumed["final_step"] == 3
    assert resumed["parameter_fingerprint"] != straight["parameter_fingerprint"]


def test_teacher_follows_once_per_optimizer_update_with_accumulation_and_bf16(demo_root, tmp_path, monkeypatch):
    """Two micro-batches per update, bf16 autocast: one EMA update per optimizer step, not per micro-batch."""
    calls = []
    original = MeanTeacherMethod.after_optimizer_step

    def spy(self, networks, step):
        calls.append(step)
        assert len(networks) == 2 and not isinstance(networks[0], torch.nn.parallel.DistributedDataParallel)
        for network in networks:  # the teacher (not prepared by accelerate) computes in bf16 like the student
            dtypes = []
            conv = next(m for m in network.modules() if isinstance(m, torch.nn.Conv2d))
            hook = conv.register_forward_hook(lambda module, inputs, output: dtypes.append(output.dtype))
            mode = network.training
            with torch.no_grad():  # eval mode: the probe leaves the BN statistics alone
                logits = network.eval()(pixel_values=torch.zeros(1, 3, 16, 16)).logits
            hook.remove()
            network.train(mode)
            assert dtypes == [torch.bfloat16] and logits.dtype == torch.float32
        return original(self, networks, step)

    monkeypatch.setattr(MeanTeacherMethod, "after_optimizer_step", spy)
    out = tmp_path / "accumulate"
    results = train_cps.main(tiny_args(demo_root, out, "--method", "mean_teacher_cutmix", "--max_train_steps", "2",
                                       "--gradient_accumulation_steps", "2", "--mixed_precision", "bf16"))
    assert results["final_step"] == 2 and calls == [0, 1]
    records = [r for r in _read_log(out) if "loss" in r]
    assert [r["step"] for r in records] == [1, 2]
    assert all(torch.isfinite(torch.tensor([r["loss"], r["loss_mt"]])).all() for r in records)


def test_two_cpu_processes_stay_in_sync(demo_root, tmp_path):
    """mean_teacher_cutmix under `accelerate launch --multi_gpu --num_processes 2` on CPU (gloo): the
    script checks that every rank ends with the same fingerprint (student and teacher)."""
    out = tmp_path / "ddp"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(SCRIPT),
               *tiny_args(demo_root, out, "--method", "mean_teacher_cutmix", "--max_train_steps", "3")]
    completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    rank_lines = [line for line in completed.stderr.splitlines() if line.startswith("[rank")]
    assert completed.returncode == 0, "\n".join(rank_lines[-60:]) or completed.stderr[-3000:]
    results = json.loads((out / "all_results.json").read_text())
    assert results["num_processes"] == 2 and results["final_step"] == 3
    records = [r for r in _read_log(out) if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3]
    # per-class kept fractions (0.97 threshold): ranks may predict different classes, the keys are unioned
    assert all(any(key.startswith("pseudo_kept_u/") for key in r) for r in records)
    assert "teacher (network 2 of 2)" in _card_row(out / "model")


def test_teacher_follows_a_compiled_student(demo_root, tmp_path, monkeypatch):
    """`accelerate launch --dynamo_backend ...`: the prepared student is a torch.compile wrapper whose state-dict
    keys carry `_orig_mod.`; the EMA update must still pair it with the (uncompiled) teacher. Dynamo's eager
    backend compiles nothing to machine code, so this runs in seconds on a CPU."""
    monkeypatch.setenv("ACCELERATE_DYNAMO_BACKEND", "EAGER")
    out = tmp_path / "compiled"
    results = train_cps.main(tiny_args(demo_root, out, "--method", "mean_teacher_cutmix", "--max_train_steps", "2"))
    assert results["final_step"] == 2
    records = [r for r in _read_log(out) if "loss" in r]
    assert [r["step"] for r in records] == [1, 2] and all(math.isfinite(r["loss_mt"]) for r in records)


def test_the_teacher_autocast_is_accelerates_own(fresh_accelerate_state):
    """autocast_follower repeats what Accelerator.prepare_model does to a model under mixed precision; compared
    with it on a copy, so an accelerate upgrade that changes its wrapper shows here."""
    import copy

    from accelerate import Accelerator

    from cps_hf.training import autocast_follower

    accelerator = Accelerator(mixed_precision="bf16", cpu=True)
    network = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU()).eval()
    prepared = accelerator.prepare_model(copy.deepcopy(network), evaluation_mode=True)
    follower = autocast_follower(copy.deepcopy(network), accelerator)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        expected, got, plain = prepared(x), follower(x), network(x)
    assert got.dtype == torch.float32 and torch.equal(got, expected) and not torch.equal(got, plain)
    restored = accelerator.unwrap_model(follower, keep_fp32_wrapper=False)
    with torch.no_grad():
        assert torch.equal(restored(x), plain)  # the wrapper comes off as a prepared model's does
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(True)
    full = Accelerator(mixed_precision="no", cpu=True)
    assert autocast_follower(network, full) is network and "forward" not in vars(network)
