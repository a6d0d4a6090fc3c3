"""scripts/self_train.py (paper Table 7) on a tiny generated VOC tree: the three stages end to end, pseudo
labels equal to the stage-1 model's argmax, the stage-3 tree, skipping finished stages and resuming."""

import json
import shutil
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from cps_hf.data import build_datasets
from cps_hf.errors import UserInputError
from cps_hf.self_training import (
    SelfTrainingError,
    compose_stage3_tree,
    pseudo_labels_finished,
    resume_flags,
    stage3_data_flags,
)
from repo_modules import load

ROOT = Path(__file__).resolve().parents[1]


def _load(name):
    return load(f"scripts/{name}.py")


self_train = _load("self_train")


from test_train import demo_root, fresh_accelerate_state, tiny_args  # noqa: E402,F401  (shared fixtures)


def tiny_flags(demo_root, *extra):
    """tests/test_train.py's tiny_args without --output_dir (self_train.py picks one per stage)."""
    args = tiny_args(demo_root, "unused")
    at = args.index("--output_dir")
    return [*args[:at], *args[at + 2:], "--max_train_steps", "2", "--checkpointing_steps", "1", *extra]


@pytest.fixture(scope="module")
def finished_run(demo_root, tmp_path_factory):
    """One complete chain: CPS in stage 1 ("Ours + Self-Training"), supervised retraining in stage 3."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    out = tmp_path_factory.mktemp("st") / "run"
    summary = self_train.main(["--output_dir", str(out), "--stage1_method", "cps", "--", *tiny_flags(demo_root)])
    return out, summary


def _stage1_split(demo_root):
    return build_datasets("voc", demo_root, "8", seed=0)


def _count_training(monkeypatch):
    calls = []
    real = self_train.run_training

    def counting(argv):
        calls.append(list(argv))
        return real(argv)

    monkeypatch.setattr(self_train, "run_training", counting)
    return calls


def test_chain_runs_end_to_end(finished_run, demo_root):
    out, summary = finished_run
    saved = json.loads((out / "self_training_results.json").read_text())
    assert saved == summary
    stage1 = json.loads((out / "stage1" / "all_results.json").read_text())
    stage3 = json.loads((out / "stage3" / "all_results.json").read_text())
    assert saved["stage1_mean_iou"] == stage1["eval_mean_iou"] and saved["stage3_mean_iou"] == stage3["eval_mean_iou"]
    assert stage1["method"] == "cps" and stage3["method"] == "supervised"
    assert saved["num_pseudo_labeled"] == 32  # 40 training images, 8 labeled
    assert stage1["num_labeled"] == 8 and stage1["num_unlabeled"] == 32
    # Stage 3: every training image labeled, an empty unlabeled pool, as many steps as stage 1.
    assert stage3["num_labeled"] == 40 and stage3["num_unlabeled"] == 0
    assert stage3["final_step"] == stage1["final_step"] == 2
    assert (out / "stage3" / "model" / "config.json").is_file()
    protocols = [json.loads((out / stage / "model" / "config.json").read_text())["eval_protocol"]
                 for stage in ("stage1", "stage3")]
    assert protocols[0] == protocols[1]  # stage 3 is scored exactly as stage 1


def test_stage3_trains_on_the_labeled_and_the_pseudo_labeled_images(finished_run, demo_root):
    out, _ = finished_run
    bundle = _stage1_split(demo_root)
    labeled, unlabeled = set(bundle.labeled["id"]), set(bundle.unlabeled["id"])
    tree = out / "stage3_data"
    train_images = {p.stem for p in (tree / "train" / "images").iterdir()}
    train_labels = {p.stem for p in (tree / "train" / "labels").iterdir()}
    assert train_images == train_labels == labeled | unlabeled and not labeled & unlabeled
    # Labeled images keep their true labels; unlabeled ones get the pseudo labels; val is the original split.
    true_labels = bundle.labeled.cast_column("label", datasets.Image(decode=False))
    for sample_id, label in zip(true_labels["id"], true_labels["label"]):
        target = (tree / "train" / "labels" / f"{sample_id}.png").resolve()
        assert target == Path(label["path"]).resolve() and "VOCdevkit" in label["path"]
    for sample_id in unlabeled:
        target = (tree / "train" / "labels" / f"{sample_id}.png").resolve()
        assert target == (out / "pseudo_labels" / "labels" / f"{sample_id}.png").resolve()
        image = (tree / "train" / "images" / f"{sample_id}.jpg").resolve()
        assert image == (demo_root / "VOCdevkit" / "VOC2012" / "JPEGImages" / f"{sample_id}.jpg").resolve()
    assert {p.stem for p in (tree / "val" / "images").iterdir()} == set(bundle.val["id"])
    classes = json.loads((tree / "classes.json").read_text())
    assert classes["classes"] == bundle.class_names and classes["ignore_index"] == 255
    # What train_cps.py's folder loader makes of it: all labeled, nothing left unlabeled.
    stage3 = build_datasets("folder", tree, "1.0", seed=0)
    assert set(stage3.labeled["id"]) == labeled | unlabeled and len(stage3.unlabeled) == 0
    assert stage3.class_names == bundle.class_names


def test_pseudo_labels_are_the_stage1_models_argmax(finished_run, demo_root):
    import transformers

    import cps_hf  # noqa: F401  (registers the Auto classes)

    out, _ = finished_run
    model = transformers.AutoModelForSemanticSegmentation.from_pretrained(out / "stage1" / "model").eval()
    processor = transformers.AutoImageProcessor.from_pretrained(out / "stage1" / "model")
    mean, std = np.array(processor.image_mean), np.array(processor.image_std)
    assert model.config.eval_protocol["mode"] == "whole" and model.config.eval_protocol["crop_size"] == 32
    records = [json.loads(line) for line in (out / "pseudo_labels" / "manifest.jsonl").read_text().splitlines()]
    bundle = _stage1_split(demo_root)
    assert [r["id"] for r in records] == list(bundle.unlabeled["id"])  # pool order, every unlabeled image once
    assert json.loads((out / "pseudo_labels" / "complete.json").read_text())["num_pseudo_labeled"] == 32
    for record in records:
        image = np.asarray(Image.open(record["input"]).convert("RGB"), dtype=np.float32) / 255.0
        pixels = torch.from_numpy(((image - mean) / std).transpose(2, 0, 1)[None].astype(np.float32))
        with torch.no_grad():  # 40x52 images are larger than the 32 px crop: the whole image, unpadded
            logits = model(pixel_values=pixels).logits
        logits = torch.nn.functional.interpolate(logits, size=image.shape[:2], mode="bilinear", align_corners=False)
        expected = logits.argmax(1)[0].numpy()
        label = Image.open(record["label"])
        assert label.mode == "P" and Path(record["label"]).name == f"{record['id']}.png"
        np.testing.assert_array_equal(np.asarray(label), expected)
        assert record["classes"] == sorted(np.unique(expected).tolist())


def test_a_rerun_skips_every_finished_stage(finished_run, demo_root, monkeypatch, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished_run[0], out, symlinks=True)
    calls = _count_training(monkeypatch)
    predicted = []
    monkeypatch.setattr(self_train, "predict_pseudo_labels", lambda *a, **k: predicted.append(1))
    summary = self_train.main(["--output_dir", str(out), "--stage1_method", "cps", "--", *tiny_flags(demo_root)])
    assert calls == [] and predicted == []
    assert summary["stage3_mean_iou"] == finished_run[1]["stage3_mean_iou"]


def test_a_run_interrupted_after_stage1_resumes_at_stage2(finished_run, demo_root, monkeypatch, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished_run[0] / "stage1", out / "stage1")
    (out / "pseudo_labels" / "labels").mkdir(parents=True)  # a stage 2 killed half-way: no completion marker
    (out / "pseudo_labels" / "manifest.jsonl").write_text('{"id": "partial"}\n')
    argv = ["--output_dir", str(out), "--stage1_method", "cps", "--", *tiny_flags(demo_root)]

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(self_train, "predict_pseudo_labels", killed)
    calls = _count_training(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        self_train.main(argv)
    assert calls == []  # stage 1 was finished: not trained again
    monkeypatch.undo()
    calls = _count_training(monkeypatch)
    summary = self_train.main(argv)
    assert len(calls) == 1 and calls[0][-1] == str(out / "stage3")  # stage 3 only
    assert "--resume_from_checkpoint" not in calls[0]
    assert summary["num_pseudo_labeled"] == 32
    records, references = ([json.loads(line) for line in manifest.read_text().splitlines()]
                           for manifest in (out / "pseudo_labels" / "manifest.jsonl",
                                            finished_run[0] / "pseudo_labels" / "manifest.jsonl"))
    assert [r["id"] for r in records] == [r["id"] for r in references]
    for record, reference in zip(records, references):  # the same stage-1 model gives the same pseudo labels
        assert np.array_equal(np.asarray(Image.open(record["label"])), np.asarray(Image.open(reference["label"])))


def test_an_unfinished_training_stage_resumes_from_its_latest_checkpoint(finished_run, demo_root, monkeypatch,
                                                                          tmp_path):
    out = tmp_path / "run"
    shutil.copytree(finished_run[0], out, symlinks=True)
    shutil.rmtree(out / "stage3_data")  # links into the old run's folder: made afresh
    (out / "stage3" / "all_results.json").unlink()  # stage 3 killed after its last checkpoint
    shutil.rmtree(out / "stage3" / "model")
    calls = _count_training(monkeypatch)
    summary = self_train.main(["--output_dir", str(out), "--stage1_method", "cps", "--", *tiny_flags(demo_root)])
    assert len(calls) == 1 and calls[0][-2:] == ["--resume_from_checkpoint", "latest"]
    assert str(out / "stage3") in calls[0]
    assert summary["stage3"]["final_step"] == 2
    assert summary["stage3_mean_iou"] == pytest.approx(finished_run[1]["stage3_mean_iou"])


def test_stage_bookkeeping(tmp_path):
    stage = tmp_path / "stage"
    assert resume_flags(stage) == []
    stage.mkdir()
    (stage / "log.jsonl").write_text('{"step": 1}\n')  # stopped before its first checkpoint: start again
    assert resume_flags(stage) == ["--overwrite_output_dir"]
    (stage / "step_3").mkdir(parents=True)
    (stage / "step_3" / "checkpoint_complete.json").write_text('{"step": 3}')
    (stage / "step_5").mkdir()  # a save that never finished
    assert resume_flags(stage) == ["--resume_from_checkpoint", "latest"]
    (stage / "all_results.json").write_text("{}")
    assert resume_flags(stage) == []
    assert not pseudo_labels_finished(tmp_path / "none", "abc", ["a"])
    flags = stage3_data_flags("tree")
    assert flags[flags.index("--labeled") + 1] == "1.0" and flags[flags.index("--dataset") + 1] == "folder"


def test_a_foreign_stage3_folder_is_never_deleted(demo_root, tmp_path):
    tree = tmp_path / "stage3_data"
    tree.mkdir()
    (tree / "mine.txt").write_text("keep")
    with pytest.raises(SelfTrainingError, match="was not made by self-training"):
        compose_stage3_tree(tree, _stage1_split(demo_root), [])
    assert (tree / "mine.txt").read_text() == "keep"


def test_user_mistakes_are_one_line_errors(demo_root, tmp_path, capsys):
    from cps_hf.cli import run_cli

    for argv, message in [
        (["--output_dir", str(tmp_path), "--", *tiny_flags(demo_root), "--resume_from_checkpoint", "latest"],
         "--resume_from_checkpoint is chosen per stage"),
        (["--output_dir", str(tmp_path), "--predict_batch_size", "0"], "--predict_batch_size"),
    ]:
        assert run_cli(self_train.main, argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err
    with pytest.raises(UserInputError):
        self_train.parse_args(["--output_dir", "x", "--", "--output_dir", "y"])
    for flag in (["--push_to_hub"], ["--init_from", "some/model"]):  # would act on both stages
        with pytest.raises(UserInputError, match="both training stages"):
            self_train.parse_args(["--output_dir", "x", "--", *flag])


def test_two_cpu_processes_pseudo_label_disjoint_shares(demo_root, tmp_path):
    """Under `accelerate launch` (2 gloo processes) the chain keeps one process group for all stages
    and each process pseudo-labels its own share; a rerun skips everything."""
    import os
    import subprocess
    import sys

    out = tmp_path / "run"
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               str(ROOT / "scripts" / "self_train.py"), "--output_dir", str(out), "--stage1_method", "supervised",
               "--", *tiny_flags(demo_root)]
    for attempt in range(2):
        completed = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        assert completed.returncode == 0, completed.stderr[-4000:]
    assert "stage 3: finished earlier" in completed.stdout and "stage 2: finished earlier" in completed.stdout
    records = [json.loads(line) for line in (out / "pseudo_labels" / "manifest.jsonl").read_text().splitlines()]
    shares = [{r["id"] for r in records if r["process"] == rank} for rank in (0, 1)]
    assert len(shares[0]) == len(shares[1]) == 16 and not shares[0] & shares[1]
    summary = json.loads((out / "self_training_results.json").read_text())
    assert summary["num_pseudo_labeled"] == 32 and summary["stage3"]["num_labeled"] == 40
