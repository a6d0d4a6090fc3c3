"""The study's scene generator (cps_hf.data.study_scenes) and runner (benchmarks/ssl_study.py)."""

import collections
import hashlib
import importlib
import json
import os
import statistics
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cps_hf.data import build_datasets, load_voc
from cps_hf.data.study_scenes import CLASS_WEIGHTS, MODES, STUDY_CLASSES, make_split, make_study_voc
from cps_hf.errors import UserInputError
from repo_modules import load



def _study():
    return load("benchmarks/ssl_study.py", register=True)  # once; it makes its parts (ssl_study_parts) importable


def _part(name: str):
    """A module of benchmarks/ssl_study_parts, e.g. "runner"."""
    _study()
    return importlib.import_module(f"ssl_study_parts.{name}")


def _digests(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_other_scenes(tmp_path):
    a = make_study_voc(tmp_path / "a", num_train=6, num_val=3, size=(32, 40), seed=0)
    b = make_study_voc(tmp_path / "b", num_train=6, num_val=3, size=(32, 40), seed=0)
    c = make_study_voc(tmp_path / "c", num_train=6, num_val=3, size=(32, 40), seed=1)
    assert _digests(a) == _digests(b)
    jpegs = lambda voc: sorted((voc / "JPEGImages").iterdir())  # noqa: E731
    assert [p.read_bytes() for p in jpegs(a)] != [p.read_bytes() for p in jpegs(c)]
    # the validation set is the same generator with another seed: no scene shared with training
    train_pixels = {np.asarray(Image.open(p)).tobytes() for p in jpegs(a) if p.name.startswith("train")}
    assert not train_pixels & {np.asarray(Image.open(p)).tobytes() for p in jpegs(a) if p.name.startswith("val")}
    # image i depends on (seed, i) only: a longer split starts with the same scenes
    short = [image.tobytes() for _, image, _, _ in make_split(5, 2, (32, 40))]
    assert short == [image.tobytes() for _, image, _, _ in make_split(5, 4, (32, 40))][:2]
    with pytest.raises(ValueError, match="val_seed"):
        make_study_voc(tmp_path / "d", num_train=2, num_val=2, seed=3, val_seed=3)


def test_classes_modes_and_imbalance():
    objects, labels = collections.Counter(), set()
    modes = collections.Counter()
    for _, image, label, drawn in make_split(0, 200, (48, 64)):
        assert image.dtype == np.uint8 and image.shape == label.shape + (3,)
        labels |= set(np.unique(label).tolist())
        for obj in drawn:
            objects[obj["class"]] += 1
            modes[obj["mode"]] += 1
    assert len(STUDY_CLASSES) >= 9 and labels == set(range(len(STUDY_CLASSES)))  # every class is drawn
    assert set(objects) == set(STUDY_CLASSES[1:])
    counts = sorted(objects.values())
    assert counts[-1] >= 5 * counts[0]  # imbalanced (weights 10 : 1)
    assert max(CLASS_WEIGHTS) / min(CLASS_WEIGHTS) >= 10
    assert modes[MODES[0]] > modes[MODES[1]] > modes[MODES[2]] > 0  # unequal, and the rare mode exists


def test_tree_reads_with_the_trainers_loader(tmp_path):
    make_study_voc(tmp_path, num_train=16, num_val=4, size=(32, 40))
    bundle = build_datasets("voc", tmp_path, "1/4", seed=0)
    assert bundle.class_names == STUDY_CLASSES
    assert (len(bundle.labeled), len(bundle.unlabeled), len(bundle.val)) == (4, 12, 4)
    label = np.asarray(bundle.val[0]["label"])
    assert set(np.unique(label).tolist()) <= set(range(len(STUDY_CLASSES))) | {255}  # VOC borders on val
    assert len(load_voc(tmp_path, "train_aug")) == 16


def test_labeled_objects_counts_the_trainers_labeled_images(tmp_path):
    aggregate = _part("aggregate")
    make_study_voc(tmp_path, num_train=32, num_val=2, size=(32, 40))
    voc = tmp_path / "VOCdevkit" / "VOC2012"
    scenes = json.loads((voc / "scenes.json").read_text())["train"]
    for seed in (0, 1):
        labeled_ids = build_datasets("voc", tmp_path, "1/4", seed=seed).labeled["id"]
        expected = collections.Counter(o["class"] for i in labeled_ids for o in scenes[i] if o["visible_pixels"] >= 20)
        counts = aggregate.labeled_objects(voc, "1/4", seed)
        assert {name: sum(by_mode.values()) for name, by_mode in counts.items()} == \
            {name: expected.get(name, 0) for name in STUDY_CLASSES[1:]}


def _fake_run(run, miou, per_class, rate, rss):
    run.folder.mkdir(parents=True)
    (run.folder / "all_results.json").write_text(json.dumps({
        "eval_mean_iou": miou, "eval_per_category_iou": per_class, "best_eval_mean_iou": miou,
        "final_step": 2, "num_labeled": 4}))
    (run.folder / "study_run.json").write_text(json.dumps({**run.identity(), "attempts": [
        {"command": ["train"], "resumed": False, "wall_seconds": 1.0, "max_rss_mib": rss, "exit_status": 0}]}))
    (run.folder / "log.jsonl").write_text(json.dumps({"step": 1, "images_per_second": rate}) + "\n")


def test_report_numbers_are_the_runs_numbers(tmp_path, capsys):
    study = _study()
    runs_dir, docs = tmp_path / "runs", tmp_path / "docs"
    setting = {**study.SETTINGS["tiny"], "seeds": [0, 1, 2]}
    sup_miou, cps_miou = [0.50, 0.60, 0.40], [0.56, 0.63, 0.43]
    n = len(STUDY_CLASSES)
    for run in study.plan_runs(setting, runs_dir, runs_dir / "data"):
        per_class = [0.5] * n
        if run.variant == "supervised":
            # batch 2, no unlabeled stream: 20 images/s is 0.1 s/step
            _fake_run(run, sup_miou[run.seed], per_class, rate=20.0, rss=1000.0)
        else:
            per_class[3] = 0.5 - 0.2 * (run.seed == 1)  # one class loses 20 points on seed 1
            _fake_run(run, cps_miou[run.seed], per_class, rate=10.0, rss=1100.0)  # 4 images/step: 0.4 s/step
    argv = ["--setting", "tiny", "--seeds", "0", "1", "2", "--runs-dir", str(runs_dir), "--docs-dir", str(docs),
            "--report-only", "--readme-fragment"]
    assert study.main(argv) == 0
    summary = json.loads((docs / "study.json").read_text())["summary"]
    cps = summary["table"]["1/4"]["cps"]
    assert cps["miou"]["mean"] == pytest.approx(statistics.fmean(cps_miou))
    assert cps["miou"]["std"] == pytest.approx(statistics.stdev(cps_miou))
    assert cps["paired_delta"]["mean"] == pytest.approx(0.04)
    assert cps["wins"] == 3
    assert cps["per_class_delta"][STUDY_CLASSES[3]] == pytest.approx(-0.2 / 3)
    assert summary["cost"]["cps"]["time_ratio"] == pytest.approx(4.0)
    assert summary["cost"]["cps"]["memory_ratio"] == pytest.approx(1.1)
    results = (docs / "results.md").read_text()
    assert "| supervised | 50.0 ± 10.0 |  |  | 1.00x | 1.00x |" in results
    assert "| CPS | 54.0 ± 10.1 | +4.0 | 3/3 | 4.00x | 1.10x |" in results
    assert "| CPS | 1/4 | 56.0 (+6.0) | 63.0 (+3.0) | 43.0 (+3.0) |" in results
    assert f"{STUDY_CLASSES[3]} on seed 1 (50.0 -> 30.0)" in results  # the per-seed class loss is named
    assert "Above supervised on every seed at 1/4: CPS (3/3)" in results
    fragment = (docs / "summary.md").read_text()
    markdown = _part("markdown")
    assert fragment.startswith(markdown.README_BEGIN) and fragment.rstrip().endswith(markdown.README_END)
    assert fragment in capsys.readouterr().out
    assert "--report-only" in fragment and "results.md" in fragment
    assert (docs / "miou_vs_labels.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{markdown.README_BEGIN}\nold\n{markdown.README_END}\n\n## after\n")
    study.update_readme(readme, fragment)
    assert readme.read_text() == "# x\n\n" + fragment.rstrip("\n") + "\n\n## after\n"


def test_findings_name_only_methods_that_win_every_seed_and_the_ceilings_gap():
    aggregate, markdown, settings = _part("aggregate"), _part("markdown"), _part("settings")
    names = list(STUDY_CLASSES)
    scores = {("1/4", "supervised"): [0.50, 0.60, 0.40], ("1/4", "cps"): [0.56, 0.58, 0.43],
              ("1/4", "cps_cutmix"): [0.55, 0.65, 0.45], (settings.REFERENCE, "supervised"): [0.62, 0.60, 0.70]}
    rows = [{"fraction": fraction, "variant": variant, "seed": seed, "mean_iou": miou,
             "per_class_iou": [miou] * len(names), "num_labeled": 800 if fraction == settings.REFERENCE else 200,
             "seconds_per_step": None, "max_rss_mib": None}
            for (fraction, variant), values in scores.items() for seed, miou in enumerate(values)]
    lines = markdown.findings(aggregate.aggregate(rows, names), names)
    # CPS loses seed 1 (58 < 60), so only CPS + CutMix is named
    assert "Above supervised on every seed at 1/4: CPS + CutMix (3/3); every other method is at or below " \
           "supervised on at least one labeled subset." in lines
    # ceiling 64.0 against supervised 50.0 at 1/4; its seed range (10 points) is narrower than the gap
    assert "Supervised on all 800 labels reaches 64.0 ± 5.3, +14.0 over supervised at 1/4 (200 labels): what " \
           "labeling the other 600 images adds in this budget." in lines

    scores[("1/4", "cps_cutmix")] = [0.55, 0.60, 0.45]  # a tie on seed 1 is not a win
    rows = [dict(row, mean_iou=scores[(row["fraction"], row["variant"])][row["seed"]]) for row in rows]
    assert "No method is above supervised on every seed at 1/4." in markdown.findings(
        aggregate.aggregate(rows, names), names)


def test_resume_decisions_and_foreign_settings(tmp_path):
    study, runner = _study(), _part("runner")
    run = study.plan_runs(study.SETTINGS["tiny"], tmp_path, tmp_path / "data")[0]
    assert runner.next_action(run) == "fresh"
    run.folder.mkdir(parents=True)
    (run.folder / "study_run.json").write_text(json.dumps({**run.identity(), "attempts": []}))
    assert runner.next_action(run) == "fresh"  # started, never saved a checkpoint
    (run.folder / "step_1").mkdir()
    (run.folder / "step_1" / "checkpoint_complete.json").write_text('{"step": 1}')
    assert runner.next_action(run) == "resume"
    assert run.command(resume=True)[-2:] == ["--resume_from_checkpoint", "latest"]
    (run.folder / "all_results.json").write_text("{}")
    assert runner.next_action(run) == "done"
    other = {**run.identity(), "flags": run.flags + ["--learning_rate", "0.5"]}
    (run.folder / "study_run.json").write_text(json.dumps(other))
    with pytest.raises(UserInputError, match="other settings"):
        runner.next_action(run)


def test_tiny_study_end_to_end_then_nothing_to_retrain(tmp_path, capsys):
    study = _study()
    runs_dir, docs = tmp_path / "runs", tmp_path / "docs"
    argv = ["--setting", "tiny", "--runs-dir", str(runs_dir), "--docs-dir", str(docs)]
    assert study.main(argv) == 0
    finished = sorted(runs_dir.glob("*/*/all_results.json"))
    assert [p.parent.name for p in finished] == ["cps_seed0", "supervised_seed0"]
    assert not list(runs_dir.glob("*/*/step_*"))  # checkpoints go once a run is finished; model/ stays
    for name in ("results.md", "summary.md", "miou_vs_labels.png", "predictions.png", "study.json"):
        assert (docs / name).is_file(), name
    results = json.loads(finished[0].read_text())
    study_json = json.loads((docs / "study.json").read_text())
    assert study_json["summary"]["table"]["1/4"]["cps"]["per_seed"]["0"] == results["eval_mean_iou"]
    assert "python benchmarks/ssl_study.py --setting tiny" in (docs / "results.md").read_text()
    mtimes = {p: os.stat(p).st_mtime_ns for p in finished}
    capsys.readouterr()
    assert study.main(argv) == 0  # a second invocation reuses every finished run
    assert "2 of 2 runs already finished; 0 to train" in capsys.readouterr().out
    assert {p: os.stat(p).st_mtime_ns for p in finished} == mtimes


def test_kept_fractions_of_a_thresholded_run_are_read_from_its_log(tmp_path):
    """The report's per-class kept table: the second half of training, each key over the steps that logged it."""
    aggregate = _part("aggregate")
    log = tmp_path / "log.jsonl"
    records = [{"step": 1, "pseudo_kept_u": 0.1, "pseudo_kept_u/red": 0.0},
               {"step": 2, "pseudo_kept_u": 0.1},
               {"step": 3, "pseudo_kept_u": 0.5, "pseudo_kept_u/red": 0.2, "pseudo_kept_u/blue": 0.9},
               {"step": 4, "pseudo_kept_u": 0.7, "pseudo_kept_u/red": 0.4},
               {"step": 4, "eval_mean_iou": 0.5}]
    log.write_text("".join(json.dumps(r) + "\n" for r in records))
    kept = aggregate.kept_fractions(log)
    assert kept == pytest.approx({"all": 0.6, "red": 0.3, "blue": 0.9})
    log.write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n")
    assert aggregate.kept_fractions(log) is None  # no threshold: nothing to report
    assert aggregate._mean_kept([{"all": 0.5, "red": 0.2}, None, {"all": 0.7}]) == pytest.approx({"all": 0.6, "red": 0.2})
