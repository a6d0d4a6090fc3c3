"""The run folders: which runs a setting makes, whether each is done, resumable or new, and the
trainer processes (one scripts/train_cps.py each, `jobs` at a time); also the generated data they share.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from cps_hf.data.study_scenes import generator_settings, make_study_voc
from cps_hf.errors import UserInputError

from . import REPO, _load_script, say
from .settings import REFERENCE, VARIANTS, fraction_tag

TRAIN = _load_script("compare_methods").TRAIN  # scripts/train_cps.py: one process per run, as compare_methods
RUN_RECORD = "study_run.json"


def train_flags(train: dict) -> list[str]:
    flags = []
    for name, value in train.items():
        values = value if isinstance(value, list) else [value]
        flags += [f"--{name}", *(str(v) for v in values)]
    return flags


@dataclass
class Run:
    fraction: str
    variant: str
    seed: int
    folder: Path
    flags: list[str]  # trainer flags that define the run (no --data_root / --output_dir: those are places)
    data_root: Path
    data: dict  # generator.json of the data it trains on (the generator's version included)

    @property
    def name(self) -> str:
        return f"{self.variant} {self.fraction} seed {self.seed}"

    def identity(self) -> dict:
        return {"flags": self.flags, "data": self.data}

    def command(self, resume: bool) -> list[str]:
        return [sys.executable, str(TRAIN), *self.flags, "--data_root", str(self.data_root),
                "--output_dir", str(self.folder), *(["--resume_from_checkpoint", "latest"] if resume else [])]


def data_identity(data: dict) -> dict:
    return generator_settings(data["num_train"], data["num_val"], tuple(data["size"]), data["seed"], data["val_seed"])


def plan_runs(setting: dict, runs_dir: Path, data_root: Path) -> list[Run]:
    base = train_flags(setting["train"]) + ["--dataset", "voc", "--report_to", "none"]
    data = data_identity(setting["data"])
    cells = [(fraction, variant) for fraction in setting["fractions"] for variant in setting["methods"]]
    if setting["reference"]:
        cells.append((REFERENCE, "supervised"))
    runs = []
    for fraction, variant in cells:
        method, extra, _ = VARIANTS[variant]
        for seed in setting["seeds"]:
            flags = base + ["--labeled", fraction, "--method", method, *extra, "--seed", str(seed)]
            runs.append(Run(fraction, variant, seed, runs_dir / fraction_tag(fraction) / f"{variant}_seed{seed}",
                            flags, data_root, data))
    return runs


def read_record(folder: Path) -> dict | None:
    path = folder / RUN_RECORD
    return json.loads(path.read_text()) if path.is_file() else None


def check_identity(run: Run, record: dict | None) -> None:
    if record is None:
        return
    if {"flags": record.get("flags"), "data": record.get("data")} != run.identity():
        raise UserInputError(
            f"{run.folder} was made with other settings than this study's ({run.name}); give another --runs-dir, "
            f"or delete that folder to rerun it")


def has_complete_checkpoint(folder: Path) -> bool:
    from cps_hf.training import complete_step_folders

    return bool(complete_step_folders(folder)) if folder.is_dir() else False


def next_action(run: Run) -> str:
    """"done" (finished: reuse), "resume" (from its last complete step_N) or "fresh" (start over)."""
    record = read_record(run.folder)
    check_identity(run, record)
    if (run.folder / "all_results.json").is_file():
        return "done"
    return "resume" if record is not None and has_complete_checkpoint(run.folder) else "fresh"


STOP = threading.Event()  # set on Ctrl-C: queued runs do not start
_LIVE: set = set()  # the trainer processes running now


def execute(run: Run, env: dict) -> dict:
    """Train one run (or finish it from its last checkpoint); return its study record."""
    action = next_action(run)
    record = read_record(run.folder)
    if action == "done" or STOP.is_set():
        return record or {}
    resume = action == "resume"
    if not resume and run.folder.exists():
        shutil.rmtree(run.folder)  # a start that never saved a checkpoint: begin again, cleanly
    run.folder.mkdir(parents=True, exist_ok=True)
    record = record if resume else {**run.identity(), "attempts": []}
    (run.folder / RUN_RECORD).write_text(json.dumps(record, indent=1) + "\n")
    command = run.command(resume)
    say(f"start  {run.name}{' (resuming)' if resume else ''}")
    started = time.time()
    with open(run.folder / "train_output.txt", "a") as output:
        output.write(f"$ {' '.join(command)}\n")
        output.flush()
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env, cwd=REPO)
        _LIVE.add(process)
        try:
            _, status, usage = os.wait4(process.pid, 0)  # this child's own peak memory, not the study's
        finally:
            _LIVE.discard(process)
        process.returncode = os.waitstatus_to_exitcode(status)
    attempt = {"command": command, "resumed": resume, "wall_seconds": round(time.time() - started, 1),
               "max_rss_mib": round(usage.ru_maxrss / 1024, 1),
               "cpu_seconds": round(usage.ru_utime + usage.ru_stime, 1),
               "exit_status": process.returncode, "finished_at": time.strftime("%Y-%m-%d %H:%M:%S")}
    record["attempts"].append(attempt)
    (run.folder / RUN_RECORD).write_text(json.dumps(record, indent=1) + "\n")
    if process.returncode or not (run.folder / "all_results.json").is_file():
        say(f"FAILED {run.name}: exit status {process.returncode}; see {run.folder / 'train_output.txt'}")
        return record
    for checkpoint in run.folder.glob("step_*"):  # only needed to resume; the exported model/ stays
        shutil.rmtree(checkpoint, ignore_errors=True)
    result = json.loads((run.folder / "all_results.json").read_text())
    say(f"done   {run.name}: mIoU {100 * result['eval_mean_iou']:.1f} in {attempt['wall_seconds']:.0f} s")
    return record


def train_all(runs: list[Run], jobs: int, variants: dict = VARIANTS) -> list[Run]:
    """Train every unfinished run, `jobs` at a time; return those that did not finish. Ctrl-C stops
    the running trainers (each keeps its last checkpoint) and starts no more. `variants`: the study's
    table of methods (for the cost order)."""
    python_path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": python_path}
    todo = [run for run in runs if not (run.folder / "all_results.json").is_file()]
    say(f"{len(runs) - len(todo)} of {len(runs)} runs already finished; {len(todo)} to train with {jobs} job(s)")
    todo = run_order(todo, variants)
    pool = ThreadPoolExecutor(max_workers=max(1, jobs))
    try:
        list(pool.map(lambda r: execute(r, env), todo))
    except KeyboardInterrupt:
        STOP.set()
        for process in list(_LIVE):
            process.send_signal(signal.SIGINT)  # the trainer marks the folder interrupted; its checkpoint stays
        pool.shutdown(wait=True, cancel_futures=True)
        raise UserInputError("interrupted; run the same command again to continue from the finished runs "
                             "and the last checkpoints") from None
    pool.shutdown(wait=True)
    return [run for run in todo if not (run.folder / "all_results.json").is_file()]


def run_order(runs: list[Run], variants: dict) -> list[Run]:
    """Supervised runs first: a study stopped midway (one finished across sessions) can already pair its methods
    with the baseline. Then the costliest first, so parallel jobs end together. The order never changes a result."""
    return sorted(runs, key=lambda r: (variants[r.variant][0] != "supervised",
                                       -COST_GUESS.get(variants[r.variant][0], 1.0)))


# Step cost per trainer --method, in supervised steps; a variant costs what its method costs.
COST_GUESS = {"supervised": 1.0, "mean_teacher": 2.3, "mean_teacher_cutmix": 3.0, "sps": 2.0, "sps_cutmix": 2.7,
              "cpc": 4.0, "cps": 4.0, "cps_cutmix": 4.5, "ncps": 6.0, "fixmatch": 2.5, "unimatch": 3.5, "unimatch_v2": 3.5,
              "cps_strong": 6.0}


def ensure_data(data_dir: Path, data: dict) -> Path:
    """The study's VOC tree, generated (deterministically) unless the same one is already there."""
    expected = data_identity(data)
    marker = data_dir / "VOCdevkit" / "VOC2012" / "generator.json"
    if marker.is_file() and json.loads(marker.read_text()) == expected:
        return data_dir
    if (data_dir / "VOCdevkit").exists():
        shutil.rmtree(data_dir / "VOCdevkit")
    start = time.perf_counter()
    make_study_voc(data_dir, data["num_train"], data["num_val"], tuple(data["size"]), data["seed"], data["val_seed"])
    say(f"wrote {data['num_train']} + {data['num_val']} generated images to {data_dir} "
        f"in {time.perf_counter() - start:.0f} s")
    return data_dir

