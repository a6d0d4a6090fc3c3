"""Rare classes: per-class shares of pseudo labels and labels, the erasure alarm, class-aware thresholds."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from cps_hf.erasure_alarm import ErasureAlarm
from cps_hf.losses import cross_entropy
from cps_hf.methods import StepLogs, build_method
from cps_hf.methods.class_shares import ClassAwareThreshold
from repo_modules import load

NAMES = ["bg", "cat", "dog"]


def _logits_for(classes: torch.Tensor, confidence: torch.Tensor) -> torch.Tensor:
    """(1, 3, H, W) logits whose argmax is `classes` with softmax confidence `confidence` at each pixel."""
    other = torch.log((1 - confidence) / 2)
    logits = other[None].repeat(3, 1, 1)
    logits.scatter_(0, classes[None], torch.log(confidence)[None])
    return logits[None]


def test_shares_of_labels_and_kept_pseudo_labels_are_logged_per_class():
    method = build_method("cps", cross_entropy, class_names=NAMES, class_shares=True, pseudo_label_threshold=0.6)
    classes = torch.tensor([[0, 0, 1, 2]])
    confidence = torch.tensor([[0.9, 0.9, 0.9, 0.5]])  # the dog pixel is under the bar
    logs = StepLogs()
    method.pseudo_targets(_logits_for(classes, confidence), logs=logs, log_name="pseudo_kept_u_1")
    method.pseudo_targets(_logits_for(classes, confidence), logs=logs, log_name="pseudo_kept_l_1")  # labeled: not counted
    labels = torch.tensor([[[0, 1, 1, 255]]])
    method._supervised_losses([torch.zeros(1, 3, 1, 4)], labels, logs)
    floats = logs.to_floats()
    assert [floats[f"pseudo_share_u/{name}"] for name in NAMES] == pytest.approx([2 / 3, 1 / 3, 0.0])
    assert [floats[f"labeled_share/{name}"] for name in NAMES] == pytest.approx([1 / 3, 2 / 3, 0.0])  # 255 left out
    quiet = build_method("cps", cross_entropy, class_names=NAMES)
    logs = StepLogs()
    quiet.pseudo_targets(_logits_for(classes, confidence), logs=logs, log_name="pseudo_kept_u_1")
    assert not any(key.startswith("pseudo_share") for key in logs.to_floats())  # off unless asked


def test_class_aware_bars_follow_flexmatch():
    bars = ClassAwareThreshold(momentum=0.0)  # counts of the last update only
    assert bars.thresholds(0.9, 3, "cpu").tolist() == [0.0, 0.0, 0.0]  # FlexMatch's warm-up: every bar starts at 0
    predictions = torch.tensor([0] * 6 + [1] * 3 + [2] * 3)
    confidence = torch.tensor([0.95] * 6 + [0.95] * 2 + [0.5] + [0.5] * 3)
    bars.update(predictions, confidence, 0.9, 3)  # sigma = 6, 2, 0; unused 4
    beta = torch.tensor([6 / 6, 2 / 6, 0 / 6])
    expected = 0.9 * beta / (2 - beta)
    torch.testing.assert_close(bars.thresholds(0.9, 3, "cpu"), expected)
    restored = ClassAwareThreshold()
    restored.load_state_dict(bars.state_dict())
    torch.testing.assert_close(restored.thresholds(0.9, 3, "cpu"), expected)
    averaged = ClassAwareThreshold(momentum=0.5)
    averaged.update(predictions, confidence, 0.9, 3)
    averaged.update(torch.zeros(12, dtype=torch.long), torch.full((12,), 0.95), 0.9, 3)  # sigma = 9, 1, 0; unused 2
    torch.testing.assert_close(averaged.thresholds(0.9, 3, "cpu"),
                               0.9 * torch.tensor([1.0, 1 / 9, 0.0]) / (2 - torch.tensor([1.0, 1 / 9, 0.0])))


def test_class_aware_pseudo_labels_keep_a_less_learned_class_under_the_fixed_bar():
    method = build_method("fixmatch", cross_entropy, class_names=NAMES, class_aware_threshold=True)
    classes = torch.tensor([[0, 0, 0, 0, 1, 1]])
    confidence = torch.tensor([[0.99, 0.99, 0.99, 0.99, 0.97, 0.7]])
    method.pseudo_targets(_logits_for(classes, confidence))  # first call: every bar 0, then the counts
    targets = method.pseudo_targets(_logits_for(classes, confidence))
    # bars now: bg 0.95 (sigma 4 of max 4), cat 0.95 * (1/4) / (2 - 1/4) = 0.136: its 0.7 pixel is kept
    assert targets.tolist() == [[[0, 0, 0, 0, 1, 1]]]
    fixed = build_method("fixmatch", cross_entropy).pseudo_targets(_logits_for(classes, confidence))
    assert fixed.tolist() == [[[0, 0, 0, 0, 1, 255]]]
    assert method.checkpoint_state() == [method.class_threshold] and fixed is not None
    with pytest.raises(ValueError, match="threshold > 0"):
        build_method("cps", cross_entropy, class_aware_threshold=True)


def _window(alarm, pseudo, labeled, steps=2):
    for _ in range(steps):
        alarm.add_step([{**{f"pseudo_share_u/{k}": v for k, v in pseudo.items()},
                         **{f"labeled_share/{k}": v for k, v in labeled.items()}}])


def test_the_alarm_names_a_class_whose_pseudo_share_stays_under_a_quarter_of_its_labeled_share():
    alarm = ErasureAlarm(fraction=0.25, patience=3)
    labeled = {"bg": 0.7, "cat": 0.2, "dog": 0.1}
    warnings = []
    for window, dog in enumerate([0.05, 0.01, 0.02, 0.01, 0.0]):  # x0.5, then x0.1, x0.2, x0.1, x0
        _window(alarm, {"bg": 0.8 - dog, "cat": 0.2, "dog": dog}, labeled)
        record, raised = alarm.end_window(step=10 * (window + 1))
        warnings.append(raised)
    assert warnings[:3] == [[], [], []] and warnings[4] == []  # once per class
    assert len(warnings[3]) == 1 and "'dog'" in warnings[3][0] and "step 40" in warnings[3][0]
    assert record["pseudo_share_u/dog"] == 0.0 and record["share_ratio/cat"] == pytest.approx(1.0)
    assert record["labeled_share/dog"] == pytest.approx(0.1)


def test_a_recovering_or_nearly_unlabeled_class_does_not_ring():
    alarm = ErasureAlarm(fraction=0.25, patience=2, min_labeled_share=0.01)
    for dog in (0.0, 0.05, 0.0, 0.05):  # never two low windows in a row
        _window(alarm, {"dog": dog, "bird": 0.0}, {"dog": 0.1, "bird": 0.005})  # bird: under 1% of labeled pixels
        assert alarm.end_window(step=1)[1] == []
    with pytest.raises(ValueError, match="fraction"):
        ErasureAlarm(fraction=1.5)


def test_windows_before_the_start_step_are_logged_but_not_judged():
    alarm = ErasureAlarm(fraction=0.25, patience=1, start_step=100)
    _window(alarm, {"dog": 0.0}, {"dog": 0.1})
    record, raised = alarm.end_window(step=50)
    assert raised == [] and record["share_ratio/dog"] == 0.0
    _window(alarm, {"dog": 0.0}, {"dog": 0.1})
    assert len(alarm.end_window(step=100)[1]) == 1


# ---- through the trainer -----------------------------------------------------------------------

from test_train import demo_root, fresh_accelerate_state, tiny_args, train_cps  # noqa: E402,F401


def _records(out):
    return [json.loads(line) for line in (Path(out) / "log.jsonl").read_text().splitlines()]


def test_the_trainer_logs_shares_rings_the_alarm_and_resumes_class_aware_bars(demo_root, tmp_path):
    common = ("--method", "cps_cutmix", "--max_train_steps", "4", "--checkpointing_steps", "2",
              "--pseudo_label_threshold", "0.5", "--pseudo_label_class_aware",
              "--erasure_alarm_fraction", "0.99", "--erasure_alarm_patience", "1", "--erasure_alarm_after", "0")
    out = tmp_path / "run"
    straight = train_cps.main(tiny_args(demo_root, out, *common))
    records = _records(out)
    steps = [r for r in records if "loss" in r]
    assert all(any(k.startswith("labeled_share/") for k in r) for r in steps)
    assert any(k.startswith("share_ratio/") for r in steps for k in r)
    assert any("erasure_alarm" in r for r in records)  # at x0.99 some class is always short of its share
    shutil.rmtree(out / "step_4", ignore_errors=True)
    shutil.rmtree(out / "model")
    resumed = train_cps.main(tiny_args(demo_root, out, *common, "--resume_from_checkpoint", "latest"))
    assert resumed["parameter_fingerprint"] == straight["parameter_fingerprint"]  # the bars' counts were saved
    off = train_cps.main(tiny_args(demo_root, tmp_path / "off", "--method", "cps", "--max_train_steps", "1",
                                   "--erasure_alarm_fraction", "0"))
    assert off["final_step"] == 1
    assert not any(k.startswith("labeled_share/") for r in _records(tmp_path / "off") for k in r)


def test_the_replay_counts_right_false_and_missed_alarms(tmp_path):
    replay = load("benchmarks/erasure_alarm_replay.py")

    def run(name, ious, windows):
        folder = tmp_path / "1-16" / name
        (folder / "model").mkdir(parents=True)
        (folder / "model" / "config.json").write_text(json.dumps({"id2label": {"0": "bg", "1": "cat", "2": "dog"}}))
        (folder / "all_results.json").write_text(json.dumps({"eval_per_category_iou": ious}))
        lines = [{"step": 10 * (k + 1), "loss": 1.0, **{f"pseudo_share_u/{c}": v for c, v in shares.items()},
                  **{f"labeled_share/{c}": 0.2 for c in shares}} for k, shares in enumerate(windows)]
        (folder / "log.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))

    run("supervised_seed0", [0.9, 0.5, 0.5], [])
    (tmp_path / "1-16" / "supervised_seed0" / "log.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    low = {"bg": 0.8, "cat": 0.01, "dog": 0.01}
    run("cps_seed0", [0.9, 0.2, 0.5], [low] * 5)  # cat dropped 30 points and was named; dog named, no drop
    summary = replay.main(["--runs-dir", str(tmp_path), "--after", "0"])
    assert (summary["runs"], summary["named_and_dropped"], summary["named_without_drop"],
            summary["dropped_without_alarm"]) == (1, 1, 1, 0)


def test_class_aware_bars_reach_mean_teacher_cutmix_confident_fraction():
    """CutMix-Seg's default weighting (mean consistency x confident fraction) takes its confident pixels from the
    same bars, so --pseudo_label_class_aware changes that fraction too."""
    classes = torch.tensor([[0, 0, 0, 0, 1, 1]])
    teacher = _logits_for(classes, torch.tensor([[0.99, 0.99, 0.99, 0.99, 0.98, 0.7]]))
    student = torch.zeros_like(teacher)
    fixed = build_method("mean_teacher_cutmix", cross_entropy)
    aware = build_method("mean_teacher_cutmix", cross_entropy, class_aware_threshold=True)
    assert fixed.confidence_weighting == aware.confidence_weighting == "fraction"
    aware.consistency_loss(student, teacher)  # first call: every bar 0; then bg's 0.97, cat's ~0.18
    per_pixel_mean = fixed.per_pixel_consistency(student, teacher, classes[None]).mean()
    torch.testing.assert_close(fixed.consistency_loss(student, teacher), per_pixel_mean * 5 / 6)  # 0.7 under 0.97
    torch.testing.assert_close(aware.consistency_loss(student, teacher), per_pixel_mean)  # cat's 0.7 kept


def test_class_aware_bars_need_a_threshold_the_method_or_the_user_sets():
    from cps_hf.errors import ConfigError
    from cps_hf.training_args import parse_args

    for method in ("mean_teacher_cutmix", "fixmatch", "unimatch", "unimatch_v2"):  # their references' bars
        assert parse_args(["--method", method, "--pseudo_label_class_aware"]).pseudo_label_class_aware
    assert parse_args(["--method", "cps", "--pseudo_label_threshold", "0.9", "--pseudo_label_class_aware"])
    with pytest.raises(ConfigError, match="--method cps has none by default"):
        parse_args(["--method", "cps", "--pseudo_label_class_aware"])


@pytest.mark.parametrize("name", ["unimatch", "unimatch_v2"])
def test_class_aware_bars_count_a_steps_weak_labels_once(name, monkeypatch):
    """UniMatch labels its weak predictions for two strong views (and V1 for the feature-perturbed stream too):
    the bars' running counts take them once per step, as FixMatch's single call does."""
    from cps_hf.modeling_cps import CPSForSemanticSegmentation
    from tiny_models import tiny_config

    updates = []
    original = ClassAwareThreshold.update
    monkeypatch.setattr(ClassAwareThreshold, "update", lambda self, *a: updates.append(a[0].shape) or original(self, *a))
    method = build_method(name, cross_entropy, class_names=NAMES, class_aware_threshold=True, cps_weight=1.0)
    torch.manual_seed(0)
    networks = [CPSForSemanticSegmentation(tiny_config(NAMES)).train() for _ in range(method.num_models)]
    method.init_networks(networks)
    g = torch.Generator().manual_seed(0)
    batch = {"labeled": {"pixel_values": torch.randn(2, 3, 32, 32, generator=g),
                         "labels": torch.randint(0, 3, (2, 32, 32), generator=g)},
             "unlabeled": [{"pixel_values": torch.randn(2, 3, 32, 32, generator=g)}
                           for _ in range(method.num_unlabeled_streams)]}
    method(networks, batch, step=0)
    assert len(updates) == 1
