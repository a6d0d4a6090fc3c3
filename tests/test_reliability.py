"""A run never leaks, never lies, never stalls: secrets stay out of every output file, a
diverging run stops (or skips, when asked) instead of exporting NaN weights, impossible
settings are refused before anything is written, a failed run leaves FAILED.json and nothing
that looks finished, and a user's mistake is one line on the command line."""

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from cps_hf.errors import ConfigError, UserInputError
from cps_hf.failures import (
    FAILED_MARKER,
    NonFiniteLossError,
    NonFiniteStateError,
    check_finite_state,
    collapsed_prediction,
)

from repo_modules import load
from test_train import ROOT, SCRIPT, _read_log, demo_root, fresh_accelerate_state, tiny_args, train_cps  # noqa: F401

TOKEN = "hf_ReliabilityTestSecret0123456789abcdef"


def _files_holding(folder, needle: bytes) -> list[str]:
    return [str(path) for path in folder.rglob("*") if path.is_file() and needle in path.read_bytes()]


def test_hub_token_is_never_written(demo_root, tmp_path, monkeypatch, capsys):
    """--hub_token reaches the upload and nothing else: not the card, the saved config, the
    tensorboard files, the log, the checkpoints or the console."""
    pytest.importorskip("tensorboard")
    pushed = {}
    monkeypatch.setattr(train_cps, "push_model", lambda folder, repo, token=None: pushed.update(repo=repo, token=token))
    out = tmp_path / "token"
    out.mkdir()
    (out / FAILED_MARKER).write_text("{}")  # a stale marker from an earlier attempt
    train_cps.main(tiny_args(demo_root, out, "--method", "cps", "--max_train_steps", "2", "--checkpointing_steps", "1",
                             "--report_to", "tensorboard", "--push_to_hub", "--hub_model_id", "me/cps-test",
                             "--hub_token", TOKEN))
    assert pushed == {"repo": "me/cps-test", "token": TOKEN}  # still used for the upload
    written = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.name.startswith("events.out.tfevents") for p in written)  # the tracker did write
    assert (out / "model" / "README.md").exists() and (out / "training_config.yaml").exists()
    assert _files_holding(out, TOKEN.encode()) == []
    assert _files_holding(out, TOKEN[3:20].encode()) == []  # no partial copy either
    console = capsys.readouterr()
    assert TOKEN not in console.out + console.err
    assert not (out / FAILED_MARKER).exists()  # a finished run removes a stale marker


def _nan_at(method, bad_steps):
    """Make a method's loss NaN at the given optimizer steps (0-based); everything else unchanged."""
    compute = method.compute

    def nan_compute(models, batch, step, generator):
        output = compute(models, batch, step, generator)
        if step in bad_steps:
            output.loss = output.loss * float("nan")
            output.logs["loss"] = float("nan")
        return output

    method.compute = nan_compute
    return method


def test_diverging_run_stops_and_exports_nothing(demo_root, tmp_path):
    out = tmp_path / "diverge"
    with pytest.raises(NonFiniteLossError, match=r"step \d+: the loss is not finite .*loss_sup=.*--skip_nonfinite_steps"):
        train_cps.main(tiny_args(demo_root, out, "--method", "cps", "--max_train_steps", "6", "--learning_rate", "1e6"))
    assert not (out / "model").exists() and not (out / "all_results.json").exists()
    marker = json.loads((out / FAILED_MARKER).read_text())
    assert marker["status"] == "failed" and "NonFiniteLossError" in marker["error"]


def test_nonfinite_steps_are_skipped_only_when_asked(demo_root, tmp_path, monkeypatch):
    real_build = train_cps.method_from_args
    monkeypatch.setattr(train_cps, "method_from_args", lambda *a, **kw: _nan_at(real_build(*a, **kw), bad_steps={1}))
    with pytest.raises(NonFiniteLossError, match=r"^step 2: "):
        train_cps.main(tiny_args(demo_root, tmp_path / "strict", "--method", "cps", "--max_train_steps", "3"))

    out = tmp_path / "skip"
    results = train_cps.main(tiny_args(demo_root, out, "--method", "cps", "--max_train_steps", "3",
                                       "--checkpointing_steps", "1", "--skip_nonfinite_steps", "1"))
    assert results["nonfinite_steps_skipped"] == 1 and (out / "model").exists()
    skipped = [r for r in _read_log(out) if r.get("skipped_nonfinite_loss")]
    assert [r["step"] for r in skipped] == [2]
    # The skipped step changed no weight (BN statistics do follow the forward pass); the next one did.
    weights = [load_file(out / f"step_{step}" / "model.safetensors") for step in (1, 2, 3)]
    trained = [name for name in weights[0] if "running" not in name and "num_batches" not in name]
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in trained)
    assert not all(torch.equal(weights[1][name], weights[2][name]) for name in trained)


def test_nonfinite_weights_or_statistics_are_never_evaluated_or_exported():
    network = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
    check_finite_state([network], "step 5")  # finite: passes
    network[1].running_var[2] = float("inf")
    with pytest.raises(NonFiniteStateError, match=r"step 5: 1 tensor\(s\) hold NaN or inf, e\.g\. network 1: 1\.running_var"):
        check_finite_state([network], "step 5")


@pytest.mark.parametrize("flags, message", [
    (["--mixed_precision", "fp16"], r"--mixed_precision fp16: this run is on the CPU"),
    (["--per_device_train_batch_size", "9"], r"--per_device_train_batch_size 9 x 1 process\(es\) .* labeled set has 8"),
])
def test_settings_that_cannot_work_are_refused_before_anything_is_written(demo_root, tmp_path, flags, message):
    out = tmp_path / "refused"
    with pytest.raises(ConfigError, match=message):
        train_cps.main(tiny_args(demo_root, out, "--max_train_steps", "1", *flags))
    # Nothing that looks like a started run: no config, no tracker folder, no log; the marker says why.
    assert sorted(p.name for p in out.iterdir() if p.name not in ("data_check.json",)) == [FAILED_MARKER]
    assert "ConfigError" in json.loads((out / FAILED_MARKER).read_text())["error"]


def test_missing_data_root_fails_before_the_first_step(tmp_path):
    out = tmp_path / "nodata"
    with pytest.raises(UserInputError, match="no_such_tree"):
        train_cps.main(tiny_args(tmp_path / "no_such_tree", out, "--max_train_steps", "1"))
    assert sorted(p.name for p in out.iterdir()) == [FAILED_MARKER]


def _cli(*args, env_extra=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.run([*args], capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)


def test_user_errors_are_one_line_also_under_accelerate_launch(demo_root, tmp_path):
    """A fixable mistake prints `error: <culprit and what to do>` and exits 2; --debug gives the traceback."""
    bad = tiny_args(demo_root, tmp_path / "cli", "--crop_size", "0")
    plain = _cli(sys.executable, str(SCRIPT), *bad)
    assert plain.returncode == 2
    assert plain.stderr.strip().splitlines() == ["error: --crop_size must be >= 1, got 0"]

    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    launched = _cli(accelerate, "launch", "--quiet", "--num_processes", "1", "--num_machines", "1",
                    "--mixed_precision", "no", "--dynamo_backend", "no", str(SCRIPT), *bad)
    assert launched.returncode != 0
    assert "error: --crop_size must be >= 1, got 0" in launched.stderr and "Traceback" not in launched.stderr

    debug = _cli(sys.executable, str(SCRIPT), *bad, "--debug")
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "ConfigError" in debug.stderr


def test_init_from_starts_where_a_trained_model_ended(demo_root, tmp_path):
    """--init_from takes a trained export; with a negligible lr the run keeps those weights."""
    first = tmp_path / "first"
    train_cps.main(tiny_args(demo_root, first, "--method", "supervised", "--max_train_steps", "2"))
    second = tmp_path / "second"
    train_cps.main(tiny_args(demo_root, second, "--method", "cps", "--max_train_steps", "1", "--learning_rate", "1e-30",
                             "--init_from", str(first / "model")))
    before, after = load_file(first / "model" / "model.safetensors"), load_file(second / "model" / "model.safetensors")
    trained = [name for name in before if "running" not in name and "num_batches" not in name]
    assert trained and all(torch.allclose(before[name], after[name], rtol=0, atol=1e-12) for name in trained)


def test_collapse_is_one_class_on_nearly_every_pixel_beyond_its_true_share():
    names = ["background", "cat", "dog"]
    collapsed = torch.tensor([[1, 0, 60], [0, 1, 30], [0, 0, 8]])  # rows truth, columns prediction: dog on 98/100
    message = collapsed_prediction(collapsed, names)
    assert message and "'dog' on 98%" in message and "truth has 8%" in message
    healthy = torch.tensor([[50, 5, 5], [3, 20, 2], [2, 3, 10]])
    mostly_background = torch.tensor([[90, 0, 0], [4, 1, 0], [3, 0, 2]])  # the truth is 90% background too
    assert collapsed_prediction(healthy, names) is None and collapsed_prediction(mostly_background, names) is None
    assert collapsed_prediction(torch.zeros(3, 3, dtype=torch.long), names) is None  # nothing scored


def test_an_evaluation_that_predicts_one_class_everywhere_is_warned_and_logged(demo_root, tmp_path, capsys):
    """A real collapse: the classifier's bias makes one class win on every pixel; evaluation names it."""
    first = tmp_path / "first"
    train_cps.main(tiny_args(demo_root, first, "--method", "supervised", "--max_train_steps", "1"))
    weights = load_file(first / "model" / "model.safetensors")
    bias = next(name for name in weights if name.endswith("classifier.bias"))
    weights[bias] = torch.full_like(weights[bias], -1e4)
    weights[bias][1] = 1e4
    save_file(weights, first / "model" / "model.safetensors", metadata={"format": "pt"})
    out = tmp_path / "collapsed"
    capsys.readouterr()
    train_cps.main(tiny_args(demo_root, out, "--method", "supervised", "--max_train_steps", "1", "--learning_rate", "1e-30",
                             "--init_from", str(first / "model")))
    class_name = json.loads((first / "model" / "config.json").read_text())["id2label"]["1"]
    warned = [r for r in _read_log(out) if "collapse_warning" in r]
    assert len(warned) == 1 and warned[0]["step"] == 1 and f"predicts {class_name!r} on 100%" in warned[0]["collapse_warning"]
    assert "warning: step 1: the network predicts" in capsys.readouterr().out
    assert warned[0]["collapse_warning"] == json.loads((out / "all_results.json").read_text())["collapse_warning"]
    card = (out / "model" / "README.md").read_text()
    assert f"**Warning: at this evaluation the network predicts {class_name!r} on 100%" in card
    first_collapsed = "collapse_warning" in json.loads((first / "all_results.json").read_text())
    assert ("**Warning: at this evaluation" in (first / "model" / "README.md").read_text()) == first_collapsed
    summary = load("scripts/evaluate_cps.py").main(["--model", str(out / "model"), "--dataset", "voc",
                                                    "--data_root", str(demo_root), "--split", "val"])
    assert f"predicts {class_name!r} on 100%" in summary["collapse_warning"]
    assert "warning: the network predicts" in capsys.readouterr().out


@pytest.mark.parametrize("flags, error, message", [
    (["--init_from", "no/such/model_folder"], UserInputError, r"--init_from no/such/model_folder: no such file"),
    (["--backbone", "resnet5o"], ConfigError, r"--backbone: backbone 'resnet5o' is not a timm model; close names: .*resnet50"),
])
def test_bad_weights_and_backbones_are_one_line_errors(demo_root, tmp_path, flags, error, message):
    with pytest.raises(error, match=message):
        train_cps.main(tiny_args(demo_root, tmp_path / "bad", "--max_train_steps", "1", *flags))


def test_resuming_a_checkpoint_of_another_architecture_is_refused(demo_root, tmp_path):
    out = tmp_path / "resume"
    train_cps.main(tiny_args(demo_root, out, "--method", "cps", "--max_train_steps", "1", "--checkpointing_steps", "1"))
    with pytest.raises(UserInputError, match=r"step_1"):
        train_cps.main(tiny_args(demo_root, out, "--method", "cps", "--max_train_steps", "2", "--decoder_channels", "8",
                                 "--resume_from_checkpoint", "latest"))


def test_a_broken_training_image_is_found_before_the_first_step(demo_root, tmp_path):
    """Found up front (not hours in, when the stream reaches it); --skip_bad_samples trains without it
    and lists it in the output folder."""
    import shutil

    root = tmp_path / "tree"
    shutil.copytree(demo_root, root)
    voc = root / "VOCdevkit" / "VOC2012"
    train_ids = (voc / "ImageSets" / "Segmentation" / "train.txt").read_text().split()
    broken = voc / "JPEGImages" / f"{train_ids[-1]}.jpg"
    broken.write_bytes(broken.read_bytes()[:200])
    out = tmp_path / "strict"
    with pytest.raises(UserInputError, match=broken.name):
        train_cps.main(tiny_args(root, out, "--max_train_steps", "1"))
    assert not (out / "log.jsonl").exists() and not (out / "model").exists()

    out = tmp_path / "skip"
    results = train_cps.main(tiny_args(root, out, "--max_train_steps", "1", "--skip_bad_samples"))
    skipped = [json.loads(line) for line in (out / "skipped_samples.jsonl").read_text().splitlines()]
    assert len(skipped) == 1 and broken.name in json.dumps(skipped[0])
    assert results["num_labeled"] + results["num_unlabeled"] == len(train_ids) - 1


def test_run_cli_keeps_exit_codes_and_leaves_flags_after_double_dash_alone(capsys):
    from cps_hf.cli import run_cli

    seen = []

    def main(argv):
        seen.append(argv)
        return 1

    assert run_cli(main, ["--a", "--debug", "--", "--debug"]) == 1
    assert seen == [["--a", "--", "--debug"]]  # --debug before `--` is run_cli's own; after it, the child's
    assert run_cli(lambda argv: None, []) == 0

    def refuse(argv):
        raise ConfigError("--crop_size must be >= 1, got 0")

    assert run_cli(refuse, []) == 2
    assert capsys.readouterr().err.strip() == "error: --crop_size must be >= 1, got 0"
    with pytest.raises(ConfigError):
        run_cli(refuse, ["--debug"])
