"""One run per output folder (cps_hf/run_folder.py) and the command-line errors that used to escape as
tracebacks: a folder holding another run is refused (unless resumed or overwritten), a live run locks
its folder, a resume must continue the same run, Ctrl-C says how to continue, bad YAML, unknown flags
and unwritable folders are one line each."""

import json
import os
import shlex
import signal
import subprocess
import sys
import time

import pytest

from cps_hf.failures import FAILED_MARKER
from cps_hf.run_folder import RunFolderRefused, restart_flags, run_lock

from test_train import ROOT, SCRIPT, _read_log, demo_root, fresh_accelerate_state, tiny_args, train_cps  # noqa: F401


def _cli(*args, **kwargs):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=600, **kwargs)


def test_a_folder_holding_a_finished_run_is_refused_then_replaced_only_when_asked(demo_root, tmp_path):
    out = tmp_path / "run"
    train_cps.main(tiny_args(demo_root, out, "--method", "supervised", "--max_train_steps", "2",
                             "--checkpointing_steps", "1"))
    before = {path.name: path.stat().st_mtime_ns for path in out.iterdir()}
    log = (out / "log.jsonl").read_text()
    with pytest.raises(RunFolderRefused, match=r"holds another run \(all_results.json, log.jsonl, model, step_1, "
                                               r"step_2, training_config.yaml\); add --resume_from_checkpoint latest"):
        train_cps.main(tiny_args(demo_root, out, "--method", "cps", "--max_train_steps", "1"))
    assert {path.name: path.stat().st_mtime_ns for path in out.iterdir()} == before  # untouched, no FAILED.json
    assert (out / "log.jsonl").read_text() == log

    train_cps.main(tiny_args(demo_root, out, "--method", "cps", "--max_train_steps", "1", "--overwrite_output_dir"))
    assert [r["step"] for r in _read_log(out) if "loss" in r] == [1]  # one run's log, not two interleaved
    assert not (out / "step_1").exists() and not (out / "step_2").exists()  # the old run's checkpoints are gone
    assert json.loads((out / "all_results.json").read_text())["method"] == "cps"


def test_a_new_run_that_fails_to_start_leaves_the_overwritten_run_intact(demo_root, tmp_path):
    out = tmp_path / "run"
    train_cps.main(tiny_args(demo_root, out, "--method", "supervised", "--max_train_steps", "1"))
    with pytest.raises(Exception, match="no_such_tree"):
        train_cps.main(tiny_args(tmp_path / "no_such_tree", out, "--max_train_steps", "1", "--overwrite_output_dir"))
    assert (out / "model").is_dir() and (out / "all_results.json").is_file()  # deleted only once training starts
    assert restart_flags(out) == []  # finished: nothing to continue


def test_a_live_run_locks_its_folder_and_is_named_when_another_is_refused(demo_root, tmp_path):
    out = tmp_path / "locked"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from cps_hf.run_folder import run_lock\n"
         f"with run_lock({str(out)!r}):\n    print('held', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunFolderRefused, match=rf"is in use by process {holder.pid} on .* since .*; wait for"):
            train_cps.main(tiny_args(demo_root, out, "--max_train_steps", "1"))
        assert sorted(p.name for p in out.iterdir()) == ["run.lock"]  # the holder's; nothing of ours
    finally:
        holder.kill()
        holder.wait()
    with run_lock(out):  # the holder died: the operating system released its lock
        assert json.loads((out / "run.lock").read_text())["pid"] == os.getpid()
    assert not (out / "run.lock").exists()


def test_resume_must_continue_the_same_run(demo_root, tmp_path):
    out = tmp_path / "run"
    train_cps.main(tiny_args(demo_root, out, "--method", "supervised", "--max_train_steps", "2",
                             "--checkpointing_steps", "1"))
    (out / "all_results.json").unlink()
    with pytest.raises(RunFolderRefused, match=r"holds a run with other settings \(labeled: '8' there, '16' now; "
                                               r"method: 'supervised' there, 'cps' now\)"):
        train_cps.main(tiny_args(demo_root, out, "--method", "cps", "--labeled", "16", "--max_train_steps", "3",
                                 "--resume_from_checkpoint", "latest"))
    resumed = train_cps.main(tiny_args(demo_root, out, "--method", "supervised", "--max_train_steps", "3",
                                       "--resume_from_checkpoint", "latest"))  # a longer budget is fine
    assert resumed["final_step"] == 3


def test_resume_without_a_checkpoint_and_bad_output_folders_are_one_line_before_the_data_check(tmp_path):
    """The data root does not exist: each error below proves its check ran first."""
    no_data = ["--data_root", str(tmp_path / "no_data"), "--max_train_steps", "1"]
    empty = tmp_path / "empty"
    empty.mkdir()
    for flags, message in [
        (["--output_dir", str(empty), "--resume_from_checkpoint", "latest"],
         f"error: --resume_from_checkpoint latest: {empty} has no completely saved step_N checkpoint"),
        (["--output_dir", str(tmp_path / "never"), "--resume_from_checkpoint", "latest"],
         f"error: --resume_from_checkpoint latest: --output_dir {tmp_path / 'never'} does not exist"),
        (["--output_dir", str(tmp_path / "afile" / "run")], f"error: --output_dir {tmp_path / 'afile' / 'run'}: "
                                                            "cannot write there"),
        (["--output_dir", str(tmp_path / "x"), "--overwrite_output_dir", "--resume_from_checkpoint", "latest"],
         "error: --overwrite_output_dir starts the run again, --resume_from_checkpoint continues it"),
    ]:
        (tmp_path / "afile").write_text("not a folder")
        completed = _cli(*no_data, *flags)
        assert completed.returncode == 2, completed.stderr
        lines = completed.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(message), lines
    assert not (tmp_path / "never").exists() and not (tmp_path / "x").exists()


def test_bad_yaml_and_unknown_flags_are_one_line_naming_the_place_and_the_close_names(tmp_path):
    preset = tmp_path / "preset.yaml"
    preset.write_text("method: cps\ncrop_size: 64\n  scales: [1.0\n")
    completed = _cli("--config", str(preset))
    assert completed.returncode == 2
    assert completed.stderr.strip().splitlines() == [
        f"error: config file {preset}: not valid YAML at line 3, column 9: mapping values are not allowed here"]

    preset.write_text("method: cps\ncrop_sise: 64\nncps_average: true\n")
    completed = _cli("--config", str(preset))
    assert completed.returncode == 2 and len(completed.stderr.strip().splitlines()) == 1
    assert "unknown field(s) crop_sise (close: crop_size" in completed.stderr
    assert "ncps_average (removed: averaging over peers is now the default" in completed.stderr

    completed = _cli("--max_trian_steps", "3", "--learnig_rate", "0.1")
    assert completed.returncode == 2 and len(completed.stderr.strip().splitlines()) == 1
    assert completed.stderr.startswith("error: unknown argument(s): --max_trian_steps (close: --max_train_steps")
    assert "--learnig_rate (close: --learning_rate" in completed.stderr
    completed = _cli("--crop_size", "big")
    assert completed.returncode == 2
    assert completed.stderr.strip().splitlines() == [
        "error: argument --crop_size/--crop-size: invalid int value: 'big'; see `python scripts/train_cps.py --help`"]


def test_ctrl_c_prints_the_last_checkpoint_and_the_command_that_continues(demo_root, tmp_path):
    out = tmp_path / "interrupted"
    flags = tiny_args(demo_root, out, "--method", "supervised", "--max_train_steps", "100000",
                      "--checkpointing_steps", "2", "--eval_steps", "100000")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen([sys.executable, str(SCRIPT), *flags], stderr=subprocess.PIPE, text=True, env=env,
                               cwd=ROOT)
    deadline = time.time() + 300
    while not (out / "step_2" / "checkpoint_complete.json").is_file():
        assert process.poll() is None and time.time() < deadline
        time.sleep(0.2)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 130
    assert "Traceback" not in stderr
    messages = [line for line in stderr.splitlines() if line.startswith(("interrupted", "error"))]
    assert len(messages) == 1, stderr[-2000:]
    last = messages[0]
    assert last.startswith(f"interrupted: the last complete checkpoint is {out}/step_")
    command = shlex.split(last.split("continue with: ", 1)[1])
    assert command[:2] == ["python", str(SCRIPT)] and command[-2:] == ["--resume_from_checkpoint", "latest"]
    assert json.loads((out / FAILED_MARKER).read_text())["status"] == "interrupted"
    step = int(last.split("/step_")[1].split(";")[0])
    # The printed command continues the run (a shorter budget here, so the test ends).
    resumed = subprocess.run([sys.executable, *command[1:], "--max_train_steps", str(step + 1)], capture_output=True,
                             text=True, env=env, cwd=ROOT, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resuming from {out}/step_{step}" in resumed.stdout
    assert json.loads((out / "all_results.json").read_text())["final_step"] == step + 1
    assert not (out / FAILED_MARKER).exists()


def test_the_readme_training_command_keeps_a_user_error_to_one_line(tmp_path):
    """The README's main command goes through `accelerate launch --quiet`: a user error is one line there too
    (without --quiet the launcher adds its own traceback)."""
    readme = (ROOT / "README.md").read_text()
    command = next(line for line in readme.splitlines() if "accelerate launch" in line and "make_demo_data" in line)
    launch = command.split("&& ", 2)[2]  # setup && demo data && training
    assert launch.startswith(".venv/bin/accelerate launch --quiet ")
    argv = shlex.split(launch)
    accelerate = os.path.join(os.path.dirname(sys.executable), "accelerate")
    completed = subprocess.run([accelerate, *argv[1:], "--output_dir", str(tmp_path / "out"), "--crop_size", "0"],
                               capture_output=True, text=True, cwd=ROOT, timeout=600,
                               env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"})
    assert completed.returncode != 0
    assert "Traceback" not in completed.stderr
    # accelerate's own note about the launch settings it defaulted comes first; then our one line, and nothing else
    lines = [line for line in completed.stderr.strip().splitlines() if line.strip()]
    note_end = next((i for i, line in enumerate(lines) if line.startswith("To avoid this warning")), -1)
    assert lines[note_end + 1:] == ["error: --crop_size must be >= 1, got 0"], completed.stderr[-2000:]


def test_a_run_that_stopped_before_training_can_simply_be_run_again(demo_root, tmp_path):
    """A data problem stops a run before it trains: fixing the data and running the same command again works."""
    out = tmp_path / "run"
    with pytest.raises(Exception, match="no_such_tree"):
        train_cps.main(tiny_args(tmp_path / "no_such_tree", out, "--max_train_steps", "1"))
    assert sorted(p.name for p in out.iterdir()) == [FAILED_MARKER]
    assert restart_flags(out) == []
    train_cps.main(tiny_args(demo_root, out, "--max_train_steps", "1"))
    assert not (out / FAILED_MARKER).exists() and (out / "model").is_dir()


def test_ctrl_c_during_training_waits_for_the_end_of_the_step_and_a_second_one_does_not():
    from cps_hf.failures import InterruptAtStepEnd

    stop = InterruptAtStepEnd()
    with pytest.raises(KeyboardInterrupt):  # before the loop: at once
        stop.handle(2, None)
    stop.arm()
    stop.handle(2, None)  # in the loop: noted, the step goes on
    assert stop.requested
    with pytest.raises(KeyboardInterrupt):  # the loop's check after the step
        stop.check()
    with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C: at once
        stop.handle(2, None)
    multi = InterruptAtStepEnd()
    multi.arm(False)  # several processes: ranks must not stop at different steps, so no deferral
    with pytest.raises(KeyboardInterrupt):
        multi.handle(2, None)
