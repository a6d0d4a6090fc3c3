"""One run per output folder: a folder that holds another run is refused, a live run holds a lock.

Two runs in one `--output_dir` (at once, or a rerun into a finished folder) would interleave
`log.jsonl` and the tracker files, overwrite `model/`, and let `--resume_from_checkpoint latest`
pick up a checkpoint of another dataset. So, before any data is read:

- the folder must be creatable and writable (one line naming it otherwise);
- a folder holding another run's files (`RUN_FILES`, `step_N/`) is refused unless the run resumes
  (`--resume_from_checkpoint`, with the saved settings that identify the data and method unchanged)
  or `--overwrite_output_dir` (the transformers convention) says to replace it: the old run's files
  are then deleted when the new run starts training (`clear_previous_run`), not before, so a new run
  that fails to start leaves the old one intact;
- the main process holds an exclusive lock (`fcntl.flock` on `run.lock`) while the run is alive;
  another run on the folder is refused with the holder's process id, host, start time and command.
  The operating system drops the lock when the process dies, so a crash never leaves it stuck.

A refusal raises `RunFolderRefused`, which `failures.failure_marker` never records in the folder
(the folder belongs to the other run).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import sys
import time
from pathlib import Path
from typing import Iterator

from .errors import ConfigError

LOCK_FILE = "run.lock"
# What a run writes once it trains (besides step_N/): a folder holding any of them holds a run. A run that
# stopped before training (a data problem) leaves only data_check.json, skipped_samples.jsonl or FAILED.json:
# running again there is the fix, not a clash.
RUN_FILES = ("log.jsonl", "training_config.yaml", "all_results.json", "model", "model_best", "model_ensemble", "cps_hf")
# Saved settings a resumed run must share with the run it continues (the data, the labeled subset, the
# networks' roles); the budget, logging and evaluation may change.
IDENTITY_FIELDS = ("dataset", "data_root", "labeled", "train_split", "val_split", "unlabeled_extra",
                   "unlabeled_stream", "method", "num_networks", "backbone", "seed")


class RunFolderRefused(ConfigError):
    """The output folder holds another run, is in use, or cannot be written; nothing was written there."""


def previous_run_files(output_dir: str | Path) -> list[str]:
    """Names of the run files (and step_N folders) in `output_dir`, sorted."""
    folder = Path(output_dir)
    if not folder.is_dir():
        return []
    found = [name for name in RUN_FILES if (folder / name).exists()]
    found += [path.name for path in folder.glob("step_*") if path.is_dir() and path.name[5:].isdigit()]
    return sorted(found)


def check_writable(output_dir: str | Path) -> Path:
    """Create `output_dir` (and parents) and write a probe file in it; one line naming it if either fails."""
    folder = Path(output_dir)
    if folder.exists() and not folder.is_dir():
        raise RunFolderRefused(f"--output_dir {folder}: exists and is not a folder; give a folder path")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write_probe.{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as error:
        raise RunFolderRefused(f"--output_dir {folder}: cannot write there ({error.strerror or error}); "
                               "give a folder you can write to") from None
    return folder


def _same_path(a, b) -> bool:
    return a == b or (a is not None and b is not None and os.path.realpath(str(a)) == os.path.realpath(str(b)))


def _same_data_root(saved: dict, current: dict) -> bool:
    """The same data folder, or the same place relative to the run folder: a run moved or copied together
    with its data (self_train.py's stage-3 data beside the stage's folder, a copied experiment tree)."""
    if _same_path(saved.get("data_root"), current.get("data_root")):
        return True
    try:
        inside = [os.path.relpath(os.path.realpath(str(config["data_root"])), os.path.realpath(str(config["output_dir"])))
                  for config in (saved, current)]
    except (KeyError, TypeError, ValueError):
        return False
    return inside[0] == inside[1]


def check_resume_matches(output_dir: str | Path, args) -> None:
    """A resumed run must continue the run the folder holds: same data, labeled subset, method, seed."""
    import yaml

    saved_file = Path(output_dir) / "training_config.yaml"
    if not saved_file.is_file():
        return
    saved = yaml.safe_load(saved_file.read_text()) or {}
    current = args.to_dict()
    differences = []
    for name in IDENTITY_FIELDS:
        if name not in saved:
            continue
        before, now = saved[name], current.get(name)
        same = _same_data_root(saved, current) if name == "data_root" else str(before) == str(now)
        if not same:
            differences.append(f"{name}: {before!r} there, {now!r} now")
    if differences:
        raise RunFolderRefused(
            f"--resume_from_checkpoint: {saved_file.parent} holds a run with other settings ({'; '.join(differences)}); "
            "resume with the settings of that run (its training_config.yaml), or give another --output_dir")


def check_output_dir(args) -> Path:
    """Before the data check: the folder can be written and holds no other run (unless resumed or overwritten)."""
    if args.overwrite_output_dir and args.resume_from_checkpoint:
        raise ConfigError("--overwrite_output_dir starts the run again, --resume_from_checkpoint continues it: "
                          "give one of them")
    if args.resume_from_checkpoint and not Path(args.output_dir).is_dir():
        raise RunFolderRefused(f"--resume_from_checkpoint {args.resume_from_checkpoint}: --output_dir "
                               f"{args.output_dir} does not exist, so there is no run to continue; give the folder of "
                               "the run to resume, or drop --resume_from_checkpoint to start one")
    folder = check_writable(args.output_dir)
    found = previous_run_files(folder)
    if args.resume_from_checkpoint:
        check_resume_matches(folder, args)
        if args.resume_from_checkpoint == "latest":
            from .training import complete_step_folders

            if not complete_step_folders(folder):
                raise RunFolderRefused(
                    f"--resume_from_checkpoint latest: {folder} has no completely saved step_N checkpoint "
                    f"({', '.join(found) or 'the folder is empty'}); run without it to start (add "
                    "--overwrite_output_dir to replace what is there), or give the folder of the run to resume")
    elif found and not args.overwrite_output_dir:
        raise RunFolderRefused(
            f"--output_dir {folder} holds another run ({', '.join(found[:6])}{', ...' if len(found) > 6 else ''}); "
            "add --resume_from_checkpoint latest to continue it, --overwrite_output_dir to replace it, or give "
            "another --output_dir")
    return folder


def clear_previous_run(output_dir: str | Path) -> list[str]:
    """Delete the previous run's files (--overwrite_output_dir), when the new run starts training."""
    folder = Path(output_dir)
    removed = previous_run_files(folder)
    for name in removed:
        path = folder / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)
    return removed


def _holder(lock_path: Path) -> str:
    try:
        info = json.loads(lock_path.read_text())
        return (f"process {info.get('pid')} on {info.get('host')} since {info.get('started')} "
                f"({info.get('command')})")
    except (OSError, ValueError):
        return "another process"


@contextlib.contextmanager
def run_lock(output_dir: str | Path, enabled: bool = True) -> Iterator[None]:
    """Hold `output_dir/run.lock` exclusively for the life of the block (the main process only)."""
    if not enabled:
        yield
        return
    import fcntl

    lock_path = Path(output_dir) / LOCK_FILE
    handle = open(lock_path, "a+")
    try:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            raise RunFolderRefused(f"--output_dir {output_dir} is in use by {_holder(lock_path)}; wait for that run "
                                   "to end (or stop it), or give another --output_dir") from None
        handle.seek(0)
        handle.truncate()
        handle.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                 "started": time.strftime("%Y-%m-%d %H:%M:%S %z"),
                                 "command": " ".join(sys.argv)}))
        handle.flush()
        try:
            yield
        finally:
            lock_path.unlink(missing_ok=True)  # still held: no other run can be between the check and this
    finally:
        handle.close()


@contextlib.contextmanager
def claim_output_dir(args) -> Iterator[Path]:
    """`check_output_dir`, then the lock, taken by the main process (RANK 0 or no RANK: before the
    accelerator exists). The other ranks of a multi-process run share the main process's claim."""
    folder = check_output_dir(args)
    with run_lock(folder, enabled=int(os.environ.get("RANK", "0")) == 0):
        yield folder


def restart_flags(output_dir: str | Path) -> list[str]:
    """Flags for running again into a folder whose run did not finish: resume from its latest complete
    checkpoint, start over when it has none (--overwrite_output_dir), nothing for an empty folder."""
    from .training import complete_step_folders

    folder = Path(output_dir)
    if not folder.is_dir() or (folder / "all_results.json").is_file():
        return []
    if complete_step_folders(folder):
        return ["--resume_from_checkpoint", "latest"]
    return ["--overwrite_output_dir"] if previous_run_files(folder) else []


def continue_message(args, argv: list[str]) -> str:
    """What a Ctrl-C prints: where the last complete checkpoint is and the command that continues."""
    import shlex

    from .training import complete_step_folders

    kept, skip = [], 0
    for index, arg in enumerate(argv[1:], start=1):
        if skip:
            skip -= 1
            continue
        name = arg.split("=", 1)[0]
        if name == "--overwrite_output_dir":
            continue
        if name == "--resume_from_checkpoint":
            skip = 0 if "=" in arg else 1
            continue
        kept.append(arg)
    launcher = "accelerate launch" if "ACCELERATE_MIXED_PRECISION" in os.environ else "python"
    command = shlex.join([*launcher.split(), argv[0], *kept])
    checkpoints = complete_step_folders(args.output_dir)
    if checkpoints:
        return (f"the last complete checkpoint is {checkpoints[-1]}; continue with: "
                f"{command} --resume_from_checkpoint latest")
    return (f"no checkpoint was saved in {args.output_dir} (--checkpointing_steps {args.checkpointing_steps}); "
            f"start again with: {command} --overwrite_output_dir")
