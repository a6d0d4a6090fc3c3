"""benchmarks/peer_step.py: a wrong clone path is one line naming its flag; our side of each comparison runs a
step on a tiny network with the batch's precomputed strong views. With clones of the references named in
PEER_UNIMATCH_PATH / PEER_TORCHSEMISEG_PATH, a one-repeat run of the whole benchmark (skipped otherwise).
No timing is asserted."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from repo_modules import load
from tiny_models import tiny_config

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "peer_step.py"


@pytest.fixture(scope="module")
def peer_step():
    return load("benchmarks/peer_step.py")


def _one_line_error(peer_step, argv, capsys) -> str:
    assert peer_step.run_cli(peer_step.main, argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


def test_refuses_a_missing_clone_path_naming_the_flag(peer_step, tmp_path, capsys):
    err = _one_line_error(peer_step, ["--unimatch_path", str(tmp_path / "nowhere"), "--device", "cpu"], capsys)
    assert "--unimatch_path" in err and "no such folder" in err and "git clone https://github.com/LiheYoung/UniMatch" in err


def test_refuses_a_folder_that_is_not_the_clone(peer_step, tmp_path, capsys):
    err = _one_line_error(peer_step, ["--torchsemiseg_path", str(tmp_path), "--device", "cpu"], capsys)
    assert "--torchsemiseg_path" in err and "not a TorchSemiSeg clone" in err and "network.py" in err


def test_refuses_a_torchsemiseg_clone_not_named_so(peer_step, tmp_path, capsys):
    clone = tmp_path / "cps-original"
    for name in peer_step.REQUIRED_FILES["cps"]:
        (clone / name).parent.mkdir(parents=True, exist_ok=True)
        (clone / name).touch()
    err = _one_line_error(peer_step, ["--torchsemiseg_path", str(clone), "--device", "cpu"], capsys)
    assert "--torchsemiseg_path" in err and "named TorchSemiSeg" in err


def test_refuses_to_run_with_nothing_to_compare(peer_step, capsys):
    err = _one_line_error(peer_step, ["--device", "cpu"], capsys)
    assert "--unimatch_path" in err and "--torchsemiseg_path" in err


def test_a_module_their_code_imports_but_is_not_installed_is_one_line(tmp_path):
    """Through the benchmark's own child process: the import fails there, the parent prints its one line."""
    clone = tmp_path / "UniMatch"
    for name in ("model/semseg/deeplabv3plus.py", "model/backbone/resnet.py"):
        (clone / name).parent.mkdir(parents=True, exist_ok=True)
        (clone / name).write_text("import package_that_is_not_installed_anywhere\n")
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), "--unimatch_path", str(clone), "--device", "cpu", "--quick",
         "--crop", "33", "--repeats", "1", "--warmup", "0"],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert completed.returncode == 2, completed.stderr
    lines = completed.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --unimatch_path"), completed.stderr
    assert "package_that_is_not_installed_anywhere" in lines[0] and "pip install" in lines[0]


def _tiny_args(peer_step):
    args = peer_step.parse_args(["--unimatch_path", "unused", "--crop", "33", "--num_labels", "3", "--device", "cpu"])
    return args


@pytest.mark.parametrize("peer", ["unimatch", "cps"])
def test_our_side_runs_a_step_on_a_tiny_network(peer_step, peer):
    args = _tiny_args(peer_step)
    batch = peer_step.make_batch(peer, args)
    side = peer_step.our_side(peer, args, batch, backbone="resnet18", aspp_channels=16, decoder_channels=16,
                              low_level_channels=8)
    side.fresh()
    elapsed, cpu = peer_step.timed(side, "cpu")
    assert elapsed > 0 and cpu >= 0
    assert math.isfinite(side.last_loss())
    assert side.parameters > 0


def test_our_unimatch_step_uses_the_batch_strong_views_and_boxes(peer_step):
    """The views UniMatch's loader would hand over, all of them, each once: 2 boxes, 2 views of each stream."""
    args = _tiny_args(peer_step)
    batch = peer_step.make_batch("unimatch", args)
    assert all(batch[f"box{k}"].any() for k in (1, 2))
    method = peer_step._prepared_views_method(batch, 3)
    torch.manual_seed(0)
    from cps_hf import CPSForSemanticSegmentation

    model = CPSForSemanticSegmentation(tiny_config(3)).train()
    step_batch = {"labeled": {"pixel_values": batch["images"], "labels": batch["labels"]},
                  "unlabeled": [{"pixel_values": batch["unlabeled"]}, {"pixel_values": batch["partners"]}]}
    seen = []
    original = method.strong

    def recording(images, generator):
        view = original(images, generator)
        seen.append(view)
        return view

    method.strong = recording
    output = method([model], step_batch, 0)
    assert torch.isfinite(output.loss)
    assert method._boxes == [] and all(views == [] for views in method._views.values())
    expected = [batch["partners_s1"], batch["unlabeled_s1"], batch["partners_s2"], batch["unlabeled_s2"]]
    assert len(seen) == 4 and all(a is b for a, b in zip(seen, expected))


@pytest.mark.skipif(not (os.environ.get("PEER_UNIMATCH_PATH") or os.environ.get("PEER_TORCHSEMISEG_PATH")),
                    reason="set PEER_UNIMATCH_PATH and/or PEER_TORCHSEMISEG_PATH to clones of the references")
def test_the_benchmark_runs_against_the_clones():
    argv = [sys.executable, str(SCRIPT), "--device", "cpu", "--quick", "--crop", "33",
            "--repeats", "1", "--warmup", "0"]
    peers = []
    for peer, variable, flag in (("unimatch", "PEER_UNIMATCH_PATH", "--unimatch_path"),
                                 ("cps", "PEER_TORCHSEMISEG_PATH", "--torchsemiseg_path")):
        if os.environ.get(variable):
            argv += [flag, os.environ[variable]]
            peers.append(peer)
    completed = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
                               timeout=1200)
    assert completed.returncode == 0, completed.stderr[-3000:]
    summary = json.loads(completed.stdout.strip().splitlines()[-1])
    assert set(summary["peers"]) == set(peers)
    for peer in peers:
        entry = summary["peers"][peer]
        assert entry["parameters"]["ours"] == entry["parameters"]["theirs"]  # the same network size on both sides
        assert all(math.isfinite(value) for value in entry["last_loss"].values())
        assert entry["ratio_of_medians"] > 0
