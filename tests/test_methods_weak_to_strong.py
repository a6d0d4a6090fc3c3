"""Weak-to-strong methods (cps_hf/methods/weak_to_strong.py) and strong views (cps_hf/strong_views.py):
the views keep the geometry and are seeded, each loss against its definition on tiny networks with the
views fixed, the forward passes and their modes, the EMA teacher, and runs of the trainer."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from cps_hf.losses import cross_entropy
from cps_hf.methods import CPSStrongMethod, FixMatchMethod, UniMatchMethod, build_method
from cps_hf.methods import weak_to_strong
from cps_hf.strong_views import StrongViewSettings, cutmix_boxes, strong_view

from test_methods import NUM_CLASSES, TinySegmenter, _logits  # noqa: E402
from tiny_models import tiny_config

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
OFF = StrongViewSettings(color_jitter_p=0.0, grayscale_p=0.0, blur_p=0.0, cutmix_p=0.0)


def _generator(seed=0):
    return torch.Generator().manual_seed(seed)


def _normalised(images):
    return (images - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


def _raw(views):
    return views * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)


# ---- strong views ------------------------------------------------------------------------------


def test_a_strong_view_keeps_the_geometry_and_is_seeded():
    images = torch.full((2, 3, 16, 16), 0.2)
    images[..., 8:] = 0.8  # a vertical edge between columns 7 and 8
    batch = _normalised(images)
    assert torch.allclose(strong_view(batch, MEAN, STD, _generator(), OFF), batch, atol=1e-6)  # every op off
    strong = strong_view(batch, MEAN, STD, _generator(3))
    assert torch.equal(strong, strong_view(batch, MEAN, STD, _generator(3)))  # the generator decides everything
    assert not torch.equal(strong, strong_view(batch, MEAN, STD, _generator(4)))
    raw = _raw(strong)
    # photometric only: every row of every channel still steps up where the image did (blur keeps its centre)
    step = (raw[..., 1:] - raw[..., :-1]).abs().mean(dim=(1, 2))
    assert (step.argmax(dim=-1) == 7).all()
    grey = strong_view(batch, MEAN, STD, _generator(), StrongViewSettings(color_jitter_p=1.0, grayscale_p=1.0,
                                                                         blur_p=0.0))
    grey = _raw(grey)
    assert torch.allclose(grey[:, 0], grey[:, 1], atol=1e-5) and torch.allclose(grey[:, 1], grey[:, 2], atol=1e-5)


def test_cutmix_boxes_follow_unimatch():
    none = cutmix_boxes(4, 24, 32, _generator(), StrongViewSettings(cutmix_p=0.0))
    assert not none.any()
    boxes = cutmix_boxes(64, 24, 32, _generator(1), StrongViewSettings(cutmix_p=1.0))
    areas = boxes.float().mean(dim=(1, 2))
    assert (areas > 0).all() and (areas <= 0.4 + 1e-6).all() and areas.min() < 0.1  # U(0.02, 0.4) of the crop
    for box in boxes:  # one rectangle per image
        rows, cols = box.any(dim=1).nonzero(), box.any(dim=0).nonzero()
        assert box[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()
    half = cutmix_boxes(400, 8, 8, _generator(2))  # p 0.5 by default
    assert 0.4 < half.flatten(1).any(dim=1).float().mean() < 0.6
    with pytest.raises(ValueError, match="probability"):
        StrongViewSettings(blur_p=1.5)


# ---- the losses, with the views fixed -----------------------------------------------------------


def _batch(labeled=2, unlabeled=3, size=12, seed=5):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, NUM_CLASSES, (labeled, size, size), generator=g)
    return {"labeled": {"pixel_values": torch.randn(labeled, 3, size, size, generator=g), "labels": labels},
            "unlabeled": [{"pixel_values": torch.randn(unlabeled, 3, size, size, generator=g)} for _ in range(2)]}


@pytest.fixture
def fixed_views(monkeypatch):
    """Strong view = 0.5 x + 0.1 (per call a different shift), one box: the left half of every image."""
    calls = []

    def view(images, mean, std, generator, settings=None):
        calls.append(images)
        return 0.5 * images + 0.1 * len(calls)

    def boxes(batch, height, width, generator, settings=None, device=None):
        box = torch.zeros(batch, height, width, dtype=torch.bool)
        box[..., : width // 2] = True
        return box

    monkeypatch.setattr(weak_to_strong, "strong_view", view)
    monkeypatch.setattr(weak_to_strong, "cutmix_boxes", boxes)
    return calls


def _ce_valid(logits, target):
    """UniMatch: CE summed over the kept pixels, divided by every pixel."""
    return F.cross_entropy(logits, target, ignore_index=255, reduction="sum") / target.numel()


def _threshold_targets(logits, tau):
    confidence, labels = logits.softmax(1).max(1)
    return labels.masked_fill(confidence < tau, 255)


def test_fixmatch_is_unimatch_fixmatch_py(fixed_views):
    batch = _batch()
    x, y = batch["labeled"]["pixel_values"], batch["labeled"]["labels"]
    u, partners = (s["pixel_values"] for s in batch["unlabeled"])
    model = TinySegmenter(0).train()
    tau = 0.3
    method = build_method("fixmatch", cross_entropy, pseudo_label_threshold=tau, cps_weight=1.0)
    assert (method.num_models, method.num_unlabeled_streams, method.default_same_image) == (1, 2, True)
    out = method([model], batch, step=0)
    # forwards: the partners in eval mode without gradient, then labeled + weak together, then the strong view
    assert [(c.batch, c.grad) for c in model.calls] == [(3, False), (5, True), (3, True)]
    assert torch.equal(model.calls[1].x, torch.cat([x, u]))
    box = torch.zeros(3, 12, 12, dtype=torch.bool)
    box[..., :6] = True
    strong_u, strong_partners = fixed_views[1] * 0.5 + 0.2, fixed_views[0] * 0.5 + 0.1  # partners' view came first
    assert torch.equal(model.calls[2].x, torch.where(box[:, None], strong_partners, strong_u))

    reference = TinySegmenter(0).train()
    with torch.no_grad():
        partner_logits = _logits(reference.eval(), partners)
    reference.train()
    logits_x, weak = _logits(reference, torch.cat([x, u])).split([2, 3])
    logits_s = _logits(reference, model.calls[2].x)
    targets = _threshold_targets(torch.where(box[:, None], partner_logits, weak.detach()), tau)
    loss_u = _ce_valid(logits_s, targets)
    expected = (F.cross_entropy(logits_x, y, ignore_index=255) + loss_u) / 2
    assert out.logs["loss_u_s"] == pytest.approx(loss_u.item(), rel=1e-5)
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert 0 < out.logs["pseudo_kept_u"] < 1


def test_unimatch_is_unimatch_py_with_its_feature_perturbation(fixed_views):
    from cps_hf.modeling_cps import CPSForSemanticSegmentation

    torch.manual_seed(0)
    model = CPSForSemanticSegmentation(tiny_config(NUM_CLASSES)).train()
    batch = _batch(size=32)
    method = build_method("unimatch", cross_entropy, pseudo_label_threshold=0.0, cps_weight=1.0)
    assert method.feature_dropout == 0.5 and method.pseudo_label_threshold == 0.0
    assert build_method("unimatch", cross_entropy).pseudo_label_threshold == 0.95  # its VOC default
    out = method([model], batch, step=0)
    logs = out.logs
    assert logs["loss_u"] == pytest.approx(0.25 * logs["loss_u_s1"] + 0.25 * logs["loss_u_s2"] + 0.5 * logs["loss_u_fp"],
                                           rel=1e-5)
    assert out.loss.item() == pytest.approx((logs["loss_sup"] + logs["loss_u"]) / 2, rel=1e-5)
    assert len(fixed_views) == 4  # two strong views of the images, two of the partners


def test_the_feature_perturbation_stream_is_the_head_on_channel_dropped_features():
    from cps_hf.modeling_cps import CPSForSemanticSegmentation

    torch.manual_seed(0)
    model = CPSForSemanticSegmentation(tiny_config(NUM_CLASSES)).eval()
    images = torch.randn(2, 3, 32, 32)
    plain = model(pixel_values=images).logits
    both = model(pixel_values=images, feature_perturbation=0.5).logits
    assert both.shape[0] == 4
    assert torch.allclose(both[:2], plain, atol=1e-5)  # eval mode: the clean half is the plain forward
    assert not torch.allclose(both[2:], plain, atol=1e-3)
    seeded = [model(pixel_values=images, feature_perturbation=0.5, perturbation_seed=seed).logits for seed in (7, 7, 8)]
    assert torch.equal(seeded[0], seeded[1]) and not torch.equal(seeded[0], seeded[2])  # resumable masks
    from cps_hf.modeling_cps import _with_perturbed_copy

    features = torch.ones(64, 32, 2, 2)
    _, dropped = _with_perturbed_copy([features], 0.5, seed=3)[0].chunk(2)
    kept = (dropped[..., 0, 0] > 0).float().mean()
    assert 0.4 < kept < 0.6 and torch.allclose(dropped[dropped > 0], torch.full_like(dropped[dropped > 0], 2.0))


def test_cps_strong_crosses_the_networks_weak_labels_on_one_strong_view(fixed_views):
    batch = _batch()
    models = [TinySegmenter(0).train(), TinySegmenter(1).train()]
    method = build_method("cps_strong", cross_entropy, cps_weight=1.5)
    assert (method.num_models, method.pseudo_label_threshold, method.default_same_image) == (2, 0.0, False)
    out = method(models, batch, step=0)
    strong = models[0].calls[2].x
    assert torch.equal(models[1].calls[2].x, strong)  # one strong view for both networks
    x, y = batch["labeled"]["pixel_values"], batch["labeled"]["labels"]
    u, partners = (s["pixel_values"] for s in batch["unlabeled"])
    box = torch.zeros(3, 12, 12, dtype=torch.bool)
    box[..., :6] = True
    references = [TinySegmenter(0).train(), TinySegmenter(1).train()]
    sup, targets, students = 0, [], []
    for reference in references:
        with torch.no_grad():
            partner_logits = _logits(reference.eval(), partners)
        reference.train()
        logits_x, weak = _logits(reference, torch.cat([x, u])).split([2, 3])
        sup = sup + F.cross_entropy(logits_x, y, ignore_index=255)
        targets.append(torch.where(box[:, None], partner_logits, weak.detach()).argmax(1))
        students.append(_logits(reference, strong))
    cross = F.cross_entropy(students[0], targets[1]) + F.cross_entropy(students[1], targets[0])
    assert out.logs["loss_cps"] == pytest.approx(cross.item(), rel=1e-5)
    assert out.loss.item() == pytest.approx((sup + 1.5 * cross).item(), rel=1e-5)


def test_fixmatch_with_an_ema_teacher_is_unimatch_v2s(fixed_views):
    batch = {**_batch(), "unlabeled": _batch()["unlabeled"][:1]}
    method = build_method("fixmatch", cross_entropy, ema_teacher=True, pseudo_label_threshold=0.0)
    assert (method.num_models, method.trained_count, method.num_unlabeled_streams, method.ema_decay) == (2, 1, 1, 0.996)
    assert method.names() == ("student", "teacher")
    student, teacher = TinySegmenter(0).train(), TinySegmenter(1).train()
    method.init_networks([student, teacher])
    assert all(torch.equal(a, b) for a, b in zip(student.state_dict().values(), teacher.state_dict().values()))
    out = method([student, teacher], batch, step=0)
    assert [(c.batch, c.grad) for c in teacher.calls] == [(3, False)] and teacher.training  # eval for its forward only
    assert [(c.batch, c.grad) for c in student.calls] == [(5, True)]  # labeled + strong in one forward
    strong = student.calls[0].x[2:]
    view = fixed_views[0] * 0.5 + 0.1
    box = torch.zeros(3, 12, 12, dtype=torch.bool)
    box[..., :6] = True
    assert torch.equal(strong, torch.where(box[:, None], view.flip(0), view))  # the partner: the batch flipped
    assert out.logs["ema_decay"] == 0.0
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    method.after_optimizer_step([student, teacher], step=9)  # r = min(1 - 1/10, 0.996) = 0.9
    for key, value in teacher.state_dict().items():
        if value.is_floating_point():
            assert torch.allclose(value, 0.9 * before[key] + 0.1 * student.state_dict()[key], atol=1e-6), key
    with pytest.raises(Exception, match="ema_teacher"):
        from cps_hf.training_args import parse_args

        parse_args(["--method", "unimatch", "--ema_teacher"])


class PerturbableSegmenter(TinySegmenter):
    """TinySegmenter whose head input (the conv-BN-ReLU features) takes the model's complementary dropout."""

    def forward(self, pixel_values, complementary_dropout=None, perturbation_seed=None):
        from types import SimpleNamespace

        from cps_hf.modeling_cps import _complementary_dropout

        self.calls.append(SimpleNamespace(batch=pixel_values.shape[0], grad=torch.is_grad_enabled(), x=pixel_values,
                                          dropout=complementary_dropout, seed=perturbation_seed))
        features = self.body[:3](pixel_values)
        if complementary_dropout:
            (features,) = _complementary_dropout((features,), complementary_dropout, perturbation_seed)
        return SimpleNamespace(logits=self.body[3](features))


def test_unimatch_v2_is_unimatch_v2_py(fixed_views):
    batch = {**_batch(), "unlabeled": _batch()["unlabeled"][:1]}
    x, y = batch["labeled"]["pixel_values"], batch["labeled"]["labels"]
    u = batch["unlabeled"][0]["pixel_values"]
    tau = 0.3
    method = build_method("unimatch_v2", cross_entropy, pseudo_label_threshold=tau)
    assert (method.num_models, method.trained_count, method.num_unlabeled_streams) == (2, 1, 1)
    assert (method.ema_decay, method.complementary_dropout, method.cps_weight) == (0.996, 0.5, 1.0)
    assert method.names() == ("student", "teacher") and method.default_export == "student"
    assert build_method("unimatch_v2", cross_entropy).pseudo_label_threshold == 0.95
    student, teacher = PerturbableSegmenter(0).train(), PerturbableSegmenter(1).train()
    method.init_networks([student, teacher])
    out = method([student, teacher], batch, step=0)
    assert [(c.batch, c.grad) for c in teacher.calls] == [(3, False)] and teacher.training
    # the labeled batch alone, then both strong views in one forward with complementary dropout
    assert [(c.batch, c.grad, c.dropout) for c in student.calls] == [(2, True, None), (6, True, 0.5)]
    box = torch.zeros(3, 12, 12, dtype=torch.bool)
    box[..., :6] = True
    views = [fixed_views[0] * 0.5 + 0.1, fixed_views[1] * 0.5 + 0.2]
    expected_strong = torch.cat([torch.where(box[:, None], view.flip(0), view) for view in views])
    assert torch.equal(student.calls[1].x, expected_strong)

    reference = PerturbableSegmenter(0).train()
    with torch.no_grad():
        weak = _logits(PerturbableSegmenter(0).eval(), u)  # the teacher starts as the student's copy
    logits_x = _logits(reference, x)
    logits_s1, logits_s2 = reference(expected_strong, 0.5, student.calls[1].seed).logits.chunk(2)
    targets = _threshold_targets(torch.where(box[:, None], weak.flip(0), weak), tau)
    loss_s1, loss_s2 = _ce_valid(logits_s1, targets), _ce_valid(logits_s2, targets)
    expected = (F.cross_entropy(logits_x, y, ignore_index=255) + (loss_s1 + loss_s2) / 2) / 2
    assert out.logs["loss_u_s1"] == pytest.approx(loss_s1.item(), rel=1e-5)
    assert out.logs["loss_u"] == pytest.approx(((loss_s1 + loss_s2) / 2).item(), rel=1e-5)
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    method.after_optimizer_step([student, teacher], step=3)  # r = min(1 - 1/4, 0.996) = 0.75
    for key, value in teacher.state_dict().items():
        if value.is_floating_point():
            assert torch.allclose(value, 0.75 * before[key] + 0.25 * student.state_dict()[key], atol=1e-6), key


# ---- through the trainer -----------------------------------------------------------------------

from test_train import demo_root, fresh_accelerate_state, tiny_args, train_cps  # noqa: E402,F401


def _log(out):
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines() if "loss" in line]


@pytest.mark.parametrize("method, extra, keys", [
    ("fixmatch", [], ("loss_u_s", "pseudo_kept_u", "cutmix_fraction")),
    ("fixmatch", ["--ema_teacher"], ("loss_u_s", "ema_decay")),
    ("unimatch", [], ("loss_u_s1", "loss_u_s2", "loss_u_fp", "loss_u")),
    ("unimatch_v2", [], ("loss_u_s1", "loss_u_s2", "loss_u", "ema_decay")),
    ("cps_strong", [], ("loss_cps", "agreement_u", "loss_sup_2")),
])
def test_weak_to_strong_methods_train_export_and_resume_bit_identically(demo_root, tmp_path, monkeypatch, method,
                                                                         extra, keys):
    from transformers import pipeline
    from PIL import Image

    import cps_hf.data as data_module

    seen = {}
    real_streams = train_cps.TrainStreams
    monkeypatch.setattr(train_cps, "TrainStreams", lambda *a, **k: seen.update(k) or real_streams(*a, **k))
    monkeypatch.setenv("ACCELERATE_USE_CPU", "1")
    common = ("--method", method, *extra, "--max_train_steps", "3", "--checkpointing_steps", "2",
              "--pseudo_label_threshold", "0.3")
    out = tmp_path / "run"
    straight = train_cps.main(tiny_args(demo_root, out, *common))
    assert seen["same_unlabeled_order"] == (method != "cps_strong")  # UniMatch mixes two views of one image
    records = _log(out)
    assert [r["step"] for r in records] == [1, 2, 3]
    for key in keys:
        assert key in records[-1], key
    shutil.rmtree(out / "step_3", ignore_errors=True)
    shutil.rmtree(out / "model")
    resumed = train_cps.main(tiny_args(demo_root, out, *common, "--resume_from_checkpoint", "latest"))
    assert resumed["parameter_fingerprint"] == straight["parameter_fingerprint"]  # strong views are seeded
    segmenter = pipeline("image-segmentation", model=str(out / "model"), subtask="semantic")
    assert segmenter(Image.new("RGB", (40, 30), (90, 140, 30)))
    assert data_module  # the loaders are the usual ones: no new stream type
