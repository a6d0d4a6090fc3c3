#!/usr/bin/env python
"""Self-training (paper Table 7): train, pseudo-label the unlabeled pool, retrain on everything.

    python scripts/self_train.py --output_dir outputs/st_voc_r50_1-4 -- --config configs/voc_r50_1-4_supervised.yaml
    python scripts/self_train.py --output_dir outputs/cps_st_voc_r50_1-4 -- --config configs/voc_r50_1-4_cps.yaml
    accelerate launch scripts/self_train.py --output_dir OUT --stage1_method cps -- --config configs/demo.yaml

Stages, each in its own folder under --output_dir:
  1. OUT/stage1/          scripts/train_cps.py with the given flags (method: --stage1_method, else the
                          preset's/flags' --method): "Self-Training" with supervised, "Ours + Self-Training"
                          with cps.
  2. OUT/pseudo_labels/   the stage-1 model (OUT/stage1/model, network 1) predicts every unlabeled image of
                          the stage-1 split (same --labeled and --seed, so the same images) under the protocol
                          recorded in the model (eval_protocol, what the trainer evaluated with):
                          labels/<id>.png (pixel value = class id), manifest.jsonl (one record per image: id,
                          input, label, width, height, classes, process), complete.json (written last). Under
                          `accelerate launch` each process predicts a disjoint share.
  3. OUT/stage3/          a fresh network (--stage3_method, default supervised) trained on OUT/stage3_data/, a
                          `--dataset folder` tree linking the labeled images with their labels and the unlabeled
                          images with their pseudo labels (train/) and the original val split (val/), all of it
                          labeled (--labeled 1.0). Same flags as stage 1 otherwise. Unless the flags set
                          --max_train_steps, stage 3 runs as many steps as stage 1 did (--stage3_steps stage1;
                          `flags` keeps --num_train_epochs, whose epochs then count all images, not the
                          unlabeled pool).
Then OUT/self_training_results.json: both stages' mIoU and the number of pseudo-labeled images.

Every flag this script does not know (and everything after `--`) goes to both training stages. A rerun
skips finished stages (all_results.json; a complete pseudo-label manifest made by the same stage-1 model)
and resumes an unfinished training stage from its latest complete checkpoint (--checkpointing_steps).
A mistake the user can fix is one line `error: ...` (`--debug`: traceback).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from cps_hf.cli import ArgumentParser, run_cli  # noqa: E402
from cps_hf.errors import UserInputError  # noqa: E402
from cps_hf.self_training import (  # noqa: E402
    PSEUDO_LABELS,
    RESULTS_FILE,
    STAGE1,
    STAGE3,
    STAGE3_DATA,
    SelfTrainingError,
    clear_pseudo_label_marker,
    compose_stage3_tree,
    pseudo_labels_finished,
    read_json,
    read_manifest,
    resume_flags,
    stage3_data_flags,
    training_finished,
    unlabeled_files,
    write_json_atomic,
    write_pseudo_label_manifest,
)

SCRIPTS = Path(__file__).resolve().parent


def _load_script(name: str):
    """A sibling script as a module (scripts/ is not a package), loaded once."""
    module_name = f"cps_hf_script_{name}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


train_cps = _load_script("train_cps")
predict = _load_script("predict")


# ---------------------------------------------------------------------- arguments
def parse_args(argv=None) -> tuple[argparse.Namespace, list[str]]:
    """(this script's options, the flags for both training stages)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    own, passthrough = (argv[: argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (argv, [])
    parser = ArgumentParser(description=__doc__, allow_abbrev=False)
    parser.add_argument("--output_dir", required=True, help="the run's folder (stage1/, pseudo_labels/, ...)")
    parser.add_argument("--stage1_method", default=None,
                        help="method of stage 1 (supervised, cps, ...); default: the --method of the flags/preset")
    parser.add_argument("--stage3_method", default="supervised", help="method of the retraining stage")
    parser.add_argument("--stage3_steps", choices=["stage1", "flags"], default="stage1",
                        help="stage1: as many steps as stage 1 ran unless --max_train_steps is given; flags: the "
                             "budget flags as given (epochs then count every image of the stage-3 tree)")
    parser.add_argument("--predict_batch_size", type=int, default=1,
                        help="pseudo-labeling: images per forward pass (consecutive same-size images only)")
    args, unknown = parser.parse_known_args(own)
    passthrough = unknown + passthrough
    if args.predict_batch_size < 1:
        raise UserInputError(f"--predict_batch_size must be at least 1, got {args.predict_batch_size}")
    for flag in ("--resume_from_checkpoint", "--output_dir"):
        if any(arg == flag or arg.startswith(flag + "=") for arg in passthrough):
            raise UserInputError(f"{flag} is chosen per stage by self_train.py (stages resume by themselves); "
                                 "leave it out of the training flags")
    for flag in ("--push_to_hub", "--init_from"):  # both stages would push to one repo / stage 3 would not start fresh
        if any(arg == flag or arg.startswith(flag + "=") for arg in passthrough):
            raise UserInputError(f"{flag} would apply to both training stages; run self_train.py without it and "
                                 "push or start from OUT/stage3/model yourself")
    return args, passthrough


def training_argv(passthrough: list[str], method: str | None, output_dir: Path, extra: list[str] = ()) -> list[str]:
    """The user's flags, then this stage's: the last value of a flag wins."""
    return [*passthrough, *(["--method", method] if method else []), *extra, "--output_dir", str(output_dir)]


# ---------------------------------------------------------------------- stages
def reset_accelerate_state() -> None:
    """Between stages: the next stage's Accelerator starts from a fresh AcceleratorState and
    GradientState (it may use other settings); the PartialState, and with it the process group of an
    `accelerate launch` run, is kept for the whole chain."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(False)
    GradientState._reset_state()


@contextlib.contextmanager
def process_group_kept():
    """train_cps ends with `accelerator.end_training()`, which destroys the process group. Re-creating it
    in the same processes fails (gloo reads the old group's addresses from the launcher's store), so
    while a stage trains, destroying is a no-op; `end_process_group` destroys it once, at the end."""
    from accelerate.state import PartialState

    original = PartialState.destroy_process_group
    PartialState.destroy_process_group = lambda self, group=None: None
    try:
        yield
    finally:
        PartialState.destroy_process_group = original


def end_process_group() -> None:
    from accelerate.state import PartialState

    if PartialState._shared_state:
        PartialState().destroy_process_group()


def run_training(argv: list[str]) -> dict:
    """One training stage: scripts/train_cps.py's main, then a fresh accelerate state for the next stage."""
    try:
        with process_group_kept():
            return train_cps.main(argv)
    finally:
        reset_accelerate_state()


def training_stage(name: str, argv: list[str], output_dir: Path, is_main: bool = True) -> dict:
    """Skip a finished stage, resume an unfinished one from its latest checkpoint, else train it."""
    if training_finished(output_dir):
        if is_main:
            print(f"{name}: finished earlier ({output_dir / 'all_results.json'}), skipped")
    else:
        resume = resume_flags(output_dir)
        if is_main:
            doing = {"--resume_from_checkpoint": "resuming from the latest checkpoint in",
                     "--overwrite_output_dir": "starting again (no checkpoint was saved) in"}
            print(f"{name}: {doing.get(resume[0], 'training into') if resume else 'training into'} {output_dir}")
        run_training(argv + resume)
    return read_json(output_dir / "all_results.json")


def stage1_split(config, stage1_dir: Path, state):
    """The stage-1 split exactly: same data flags, --labeled and --seed through build_datasets, and the
    same up-front data check (its cache in stage1/ when the files are unchanged, so bad samples that
    stage 1 skipped with --skip_bad_samples are left out here too)."""
    from cps_hf.data import build_datasets, preflight_check

    bundle = build_datasets(config.dataset, config.data_root, config.labeled, seed=config.seed,
                            train_split=config.train_split, val_split=config.val_split,
                            unlabeled_extra=config.unlabeled_extra)
    with state.main_process_first():
        return preflight_check(bundle, cache_file=stage1_dir / "data_check.json",
                               skip_bad_samples=config.skip_bad_samples)


def pseudo_label_shard(pairs: list[tuple[str, str]], model, mean, std, device, protocol: dict, folder: Path,
                       batch_size: int, skip_unreadable: bool, palette,
                       process_index: int = 0) -> tuple[list[dict], str | None]:
    """This process's pseudo labels (labels/<id>.png) and manifest records; the error that stopped it."""
    import numpy as np

    from cps_hf.data import DatasetError

    id_of = {str(Path(path)): sample_id for sample_id, path in pairs}
    num_labels = model.config.num_labels
    records = []
    try:
        for item in predict.same_size_batches([Path(path) for _, path in pairs], batch_size, skip_unreadable):
            if item[0] == "skipped":
                records.append({"id": id_of[str(item[1])], "input": str(item[1]), "skipped": item[2]})
                continue
            batch = item[1]
            masks = predict.predict_class_ids(model, [image for _, image in batch], mean, std, protocol, device)
            for (path, _), mask in zip(batch, masks):
                sample_id = id_of[str(path)]
                target = folder / "labels" / f"{sample_id}.png"
                predict.save_mask(mask, target, palette, num_labels)
                records.append({"id": sample_id, "input": str(path), "label": str(target), "process": process_index,
                                "width": int(mask.shape[1]), "height": int(mask.shape[0]),
                                "classes": [int(c) for c in np.unique(mask)]})
    except DatasetError as err:
        return records, str(err)
    return records, None


def predict_pseudo_labels(model_dir: Path, pairs: list[tuple[str, str]], folder: Path, state, device, *,
                          batch_size: int, skip_unreadable: bool, palette, marker: dict) -> list[dict]:
    """Stage 2 on every process: each predicts its disjoint share, the main process writes the manifest."""
    from cps_hf.inference import describe_protocol_choice, load_segmentation_model, model_eval_protocol

    model, mean, std = load_segmentation_model(str(model_dir), device)
    options = argparse.Namespace(model=str(model_dir), mode=None, crop_size=None, stride=None, scales=[1.0],
                                 flip=False)
    protocol, source = predict.protocol_from_args(options, model_eval_protocol(model.config))
    if state.is_main_process:
        print(f"stage 2: pseudo-labeling {len(pairs)} unlabeled images with {model_dir}; "
              f"protocol: {describe_protocol_choice(protocol, source)}")
        (folder / "labels").mkdir(parents=True, exist_ok=True)
    state.wait_for_everyone()
    files = [Path(path) for _, path in pairs]
    shard = set(map(str, predict.share_of_process(files, state)))
    mine = [(sample_id, path) for sample_id, path in pairs if str(Path(path)) in shard]
    records, errors = predict.gather_records(state, *pseudo_label_shard(
        mine, model, mean, std, device, protocol, folder, batch_size, skip_unreadable, palette, state.process_index))
    if errors:
        raise UserInputError(errors[0])  # on every process, so each exits with the same status
    records = predict.in_input_order(records, files)
    if state.is_main_process:
        done = sum("skipped" not in record for record in records)
        write_pseudo_label_manifest(folder, records, {**marker, "num_pseudo_labeled": done,
                                                      "num_skipped": len(records) - done,
                                                      "protocol": describe_protocol_choice(protocol, source)})
        print(f"stage 2: wrote {done} pseudo labels under {folder / 'labels'} (manifest: {folder / 'manifest.jsonl'})")
    state.wait_for_everyone()
    return records


def main(argv=None) -> dict:
    from cps_hf.training_args import parse_args as parse_training_args

    args, passthrough = parse_args(argv)
    out = Path(args.output_dir)
    stage1_dir, pseudo_dir, tree_dir, stage3_dir = out / STAGE1, out / PSEUDO_LABELS, out / STAGE3_DATA, out / STAGE3
    stage1_argv = training_argv(passthrough, args.stage1_method, stage1_dir)
    config = parse_training_args(stage1_argv)  # flag mistakes fail here, before anything runs
    if config.unlabeled_stream:
        raise SelfTrainingError("--unlabeled_stream: a streamed pool cannot be pseudo-labeled into files; "
                                "use --unlabeled_extra or a folder of unlabeled images")
    is_main = int(os.environ.get("RANK", "0")) == 0

    # ---- stage 1 ---------------------------------------------------------------------------
    stage1 = training_stage("stage 1", stage1_argv, stage1_dir, is_main)

    # ---- stage 2, then the stage-3 tree (the main process writes, the others wait) ----------------
    state, device = predict.process_state("auto")
    bundle = stage1_split(config, stage1_dir, state)
    pairs = unlabeled_files(bundle)
    if not pairs:
        raise SelfTrainingError("the stage-1 split has no unlabeled images to pseudo-label (--labeled takes every "
                                "training image); give a smaller --labeled or an --unlabeled_extra pool")
    if len({str(Path(path)) for _, path in pairs}) != len(pairs):
        raise SelfTrainingError("the unlabeled pool lists one image file under several ids")
    ids = [sample_id for sample_id, _ in pairs]
    fingerprint = stage1.get("parameter_fingerprint")
    finished = pseudo_labels_finished(pseudo_dir, fingerprint, ids)
    state.wait_for_everyone()  # every process has looked before the main process changes anything
    if finished:
        if state.is_main_process:
            print(f"stage 2: finished earlier ({pseudo_dir / 'complete.json'}), skipped")
    else:
        if state.is_main_process:
            pseudo_dir.mkdir(parents=True, exist_ok=True)
            clear_pseudo_label_marker(pseudo_dir)
        predict_pseudo_labels(stage1_dir / "model", pairs, pseudo_dir, state, device,
                              batch_size=args.predict_batch_size, skip_unreadable=config.skip_bad_samples,
                              palette=bundle.palette or "voc",
                              marker={"stage1_fingerprint": fingerprint, "stage1_model": str(stage1_dir / "model"),
                                      "ids": ids})
    records = read_manifest(pseudo_dir)
    pseudo_summary = {k: v for k, v in read_json(pseudo_dir / "complete.json").items() if k != "ids"}
    stage3_done = training_finished(stage3_dir)
    state.wait_for_everyone()
    if not stage3_done and state.is_main_process:
        tree = compose_stage3_tree(tree_dir, bundle, records)
        print(f"stage 3 data: {len(tree['labeled_ids'])} labeled + {len(tree['pseudo_labeled_ids'])} pseudo-labeled "
              f"training images, {len(tree['val_ids'])} val images under {tree_dir}")
    state.wait_for_everyone()
    reset_accelerate_state()

    # ---- stage 3 ---------------------------------------------------------------------------
    extra = stage3_data_flags(tree_dir)
    if args.stage3_steps == "stage1" and config.max_train_steps is None:
        extra += ["--max_train_steps", str(stage1["final_step"])]
    stage3 = training_stage("stage 3", training_argv(passthrough, args.stage3_method, stage3_dir, extra), stage3_dir,
                            is_main)

    # ---- summary ---------------------------------------------------------------------------
    summary = {
        "stage1_mean_iou": stage1["eval_mean_iou"],
        "stage3_mean_iou": stage3["eval_mean_iou"],
        "num_pseudo_labeled": pseudo_summary["num_pseudo_labeled"],
        "stage1": _stage_summary(stage1, stage1_dir),
        "pseudo_labels": {**pseudo_summary, "manifest": str(pseudo_dir / "manifest.jsonl")},
        "stage3": _stage_summary(stage3, stage3_dir),
    }
    end_process_group()
    if is_main:
        write_json_atomic(out / RESULTS_FILE, summary)
        print(f"self-training: stage 1 mIoU {summary['stage1_mean_iou']:.4f} -> stage 3 mIoU "
              f"{summary['stage3_mean_iou']:.4f} with {summary['num_pseudo_labeled']} pseudo-labeled images "
              f"({out / RESULTS_FILE})")
    return summary


def _stage_summary(results: dict, output_dir: Path) -> dict:
    keys = ("method", "eval_mean_iou", "best_eval_mean_iou", "final_step", "num_labeled", "num_unlabeled")
    return {"output_dir": str(output_dir), **{key: results.get(key) for key in keys}}


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(run_cli(main))
