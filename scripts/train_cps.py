#!/usr/bin/env python
"""Train CPS (Cross Pseudo Supervision, CVPR 2021) or its supervised baseline with Accelerate.

    accelerate launch scripts/train_cps.py --config configs/voc_r101_1-8_cutmix.yaml
    python scripts/train_cps.py --config configs/demo.yaml --data_root demo_data

main() parses the flags and runs train() under a failure marker: a run that raises leaves
FAILED.json and never a finished-looking folder. train() is one linear function: accelerator,
data (checked up front), method, models, optimizer, scheduler, prepare, resume, config and
trackers, loop, evaluation, save and push. The method (supervised / cps / cps_cutmix) is a small
unit the loop calls; the loop is the same for all of them. A mistake the user can fix prints one
line (`--debug` for the traceback).
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import gather_object, set_seed
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from cps_hf.cli import run_cli  # noqa: E402
from cps_hf.erasure_alarm import ErasureAlarm  # noqa: E402
from cps_hf.errors import RunInterrupted  # noqa: E402
from cps_hf.data import (  # noqa: E402
    EvalTransform,
    TrainStreams,
    TrainTransform,
    build_datasets,
    load_unlabeled_stream,
    preflight_check,
)
from cps_hf.failures import (  # noqa: E402
    InterruptAtStepEnd,
    NonFiniteGuard,
    check_finite_state,
    collapsed_prediction,
    deferred_interrupt,
    failure_marker,
)
from cps_hf.hub import build_model_card, export_ensemble, export_model, push_model  # noqa: E402
from cps_hf.inference import TransformedDataset, evaluate_model  # noqa: E402
from cps_hf.metrics import MeanIoU  # noqa: E402
from cps_hf.optim import build_optimizer, learning_rates, poly_schedule  # noqa: E402
from cps_hf.run_folder import claim_output_dir, clear_previous_run, continue_message  # noqa: E402
from cps_hf.training import (  # noqa: E402
    JsonlLog,
    TrainProgress,
    apply_backbone_options,
    autocast_follower,
    broadcast_buffers_from_main,
    build_networks,
    check_run_settings,
    check_schedule,
    checkpoint_step,
    ddp_kwargs,
    eval_scalars,
    find_checkpoint,
    freeze_unreachable_parameters,
    jsonable,
    mark_checkpoint_complete,
    maybe_convert_sync_batchnorm,
    mean_logs,
    method_from_args,
    model_config_from_args,
    parameter_count_lines,
    parameter_fingerprint,
    per_device_batch_size,
    prune_checkpoints,
    reduce_logs,
)
from cps_hf.training_args import parse_args, save_yaml_config  # noqa: E402
from cps_hf.weights import check_checkpoint_matches  # noqa: E402

logger = get_logger(__name__)


def _trackers(report_to: str) -> list[str] | str | None:
    if report_to in ("none", ""):
        return None
    if report_to == "tensorboard":
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            return None
    return report_to


def _size(dataset) -> int | str:
    try:
        return len(dataset)
    except TypeError:  # a streamed (iterable) pool
        return "streamed"


def _to_device(batch, device):
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {key: _to_device(value, device) for key, value in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(value, device) for value in batch)
    return batch


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    with claim_output_dir(args), deferred_interrupt() as stop:  # writable, no other run there (unless resumed /
        try:                                                      # overwritten), locked while alive
            with failure_marker(args.output_dir):
                return train(args, stop)
        except KeyboardInterrupt:
            raise RunInterrupted(continue_message(args, sys.argv)) from None


def train(args, stop: InterruptAtStepEnd | None = None) -> dict:
    output_dir = Path(args.output_dir)
    stop = stop or InterruptAtStepEnd()

    # ---- accelerator -----------------------------------------------------------------------
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=_trackers(args.report_to),
        project_dir=str(output_dir),
        kwargs_handlers=[ddp_kwargs()],
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    set_seed(args.seed)
    if args.global_batch_size:
        args.per_device_train_batch_size = per_device_batch_size(
            args.global_batch_size, accelerator.num_processes, args.gradient_accumulation_steps
        )

    # ---- data ------------------------------------------------------------------------------
    unlabeled_extra = args.unlabeled_extra
    if args.unlabeled_stream:
        unlabeled_extra = load_unlabeled_stream(args.unlabeled_stream, args.unlabeled_stream_split,
                                                args.unlabeled_stream_image_column)
    bundle = build_datasets(
        args.dataset, args.data_root, args.labeled, seed=args.seed, train_split=args.train_split,
        val_split=args.val_split, unlabeled_extra=unlabeled_extra,
    )
    with accelerator.main_process_first():  # rank 0 checks every file and caches; the others reuse its cache
        bundle = preflight_check(
            bundle, cache_file=output_dir / "data_check.json", skip_bad_samples=args.skip_bad_samples,
            skipped_file=output_dir / "skipped_samples.jsonl",
        )
    check_run_settings(args, accelerator, num_labeled=len(bundle.labeled))
    method = method_from_args(args, bundle.class_names)
    streams = TrainStreams(
        bundle.labeled, bundle.unlabeled,
        TrainTransform(crop_size=args.crop_size, scales=tuple(args.scales), num_classes=len(bundle.class_names)),
        batch_size=args.per_device_train_batch_size, seed=args.seed,
        num_unlabeled_streams=method.num_unlabeled_streams,
        same_unlabeled_order=method.default_same_image if args.cutmix_same_image is None else args.cutmix_same_image,
        rank=accelerator.process_index, world_size=accelerator.num_processes, num_workers=args.num_workers,
        unlabeled_length=args.unlabeled_length, shuffle_buffer=args.shuffle_buffer,
    )
    val_set = bundle.val
    if args.max_eval_samples is not None:
        val_set = val_set.select(range(min(args.max_eval_samples, len(val_set))))
    val_set = TransformedDataset(val_set, EvalTransform(num_classes=len(bundle.class_names)))
    steps_per_epoch = math.ceil(streams.steps_per_epoch / args.gradient_accumulation_steps)
    max_train_steps = args.max_train_steps or args.num_train_epochs * steps_per_epoch
    method.set_steps_per_epoch(steps_per_epoch)  # an epoch-based lambda ramp-up becomes steps
    check_schedule(args, max_train_steps)
    logger.info(
        f"labeled {len(bundle.labeled)}, unlabeled {_size(bundle.unlabeled)}, val {len(val_set)}; "
        f"{steps_per_epoch} steps/epoch, {max_train_steps} steps", main_process_only=True,
    )

    # ---- models ----------------------------------------------------------------------------
    model_config = model_config_from_args(args, bundle.class_names, bundle.ignore_index)
    networks = build_networks(model_config, method.num_models, pretrained=args.pretrained_backbone, seed=args.seed,
                              init_from=args.init_from)
    method.init_networks(networks)  # e.g. a mean teacher starts as a copy of its student
    export_index = method.export_index(args.export_network)
    apply_backbone_options(networks, args)  # --freeze_backbone, --gradient_checkpointing
    for network in networks:
        unreachable = freeze_unreachable_parameters(network)
    if unreachable:
        logger.info(f"froze {len(unreachable)} backbone parameters that never reach the logits, e.g. {unreachable[0]}")
    num_parameters = networks[0].parameter_counts()  # network 1's, for all_results.json
    for line in parameter_count_lines(networks[:method.trained_count], list(method.names())):
        logger.info(line, main_process_only=True)
    networks = maybe_convert_sync_batchnorm(networks, accelerator)

    # ---- optimizer and scheduler -----------------------------------------------------------
    trained, followers = networks[:method.trained_count], networks[method.trained_count:]  # followers: EMA teachers
    optimizer = build_optimizer(
        trained, lr=args.learning_rate, momentum=args.momentum, weight_decay=args.weight_decay,
        optimizer=args.optimizer, head_lr_multiplier=args.head_lr_multiplier, layer_decay=args.layer_decay,
        betas=args.adam_betas,
    )
    # A prepared scheduler steps once per process (traps note): count steps that way.
    scheduler = poly_schedule(optimizer, max_train_steps * accelerator.num_processes, power=args.lr_power,
                              warmup_steps=args.warmup_steps * accelerator.num_processes)

    # ---- prepare (the data streams shard themselves: never prepared, never sharded twice) ----
    *trained, optimizer, scheduler = accelerator.prepare(*trained, optimizer, scheduler)
    # followers (EMA teachers): no optimizer, no DDP, but the trained networks' autocast
    followers = [autocast_follower(f.to(accelerator.device).requires_grad_(False), accelerator) for f in followers]
    networks = [*trained, *followers]

    def bare(network):  # out of DDP and torch.compile (--dynamo_backend) wrappers; the autocast stays
        return accelerator.unwrap_model(network, keep_torch_compile=False)

    progress = TrainProgress()
    # followers (EMA teachers) and a method's own state (class-aware thresholds) are saved as custom state
    accelerator.register_for_checkpointing(streams, progress, *followers, *method.checkpoint_state())
    alarm = ErasureAlarm(args.erasure_alarm_fraction, args.erasure_alarm_patience,
                         start_step=int(args.erasure_alarm_after * max_train_steps)) if args.erasure_alarm_fraction else None
    log = JsonlLog(output_dir / "log.jsonl", enabled=accelerator.is_main_process)
    nonfinite = NonFiniteGuard(args.skip_nonfinite_steps, accelerator, progress)

    # ---- resume ----------------------------------------------------------------------------
    if args.resume_from_checkpoint:
        checkpoint = find_checkpoint(output_dir, args.resume_from_checkpoint)
        accelerator.print(f"resuming from {checkpoint}")
        check_checkpoint_matches(checkpoint, [bare(n) for n in trained])  # one line, not a size dump
        accelerator.load_state(str(checkpoint))  # models, optimizer, scheduler, RNG, data streams, progress
        if progress.step != checkpoint_step(checkpoint):
            raise RuntimeError(f"{checkpoint}: saved progress is at step {progress.step}, folder says otherwise")
        log.truncate_after(progress.step)

    # ---- config and trackers: only now, so a run that fails to start leaves nothing that looks started
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        if args.overwrite_output_dir:  # the previous run goes only now that this one trains
            removed = clear_previous_run(output_dir)
            if removed:
                logger.info(f"--overwrite_output_dir: removed the previous run's {', '.join(removed)}")
        save_yaml_config(args, output_dir / "training_config.yaml")  # to_dict(): never the hub token
    if accelerator.log_with:
        tracker_config = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in args.to_dict().items()}
        accelerator.init_trackers("cps_hf", config=tracker_config)

    def run_evaluation() -> dict:
        broadcast_buffers_from_main(networks, accelerator)  # every rank evaluates the model rank 0 exports
        check_finite_state([bare(n) for n in networks], f"step {progress.step}")
        metric = MeanIoU(model_config.num_labels, ignore_index=bundle.ignore_index, device=accelerator.device)
        results = evaluate_model(
            [bare(networks[export_index])], val_set, num_labels=model_config.num_labels,
            ignore_index=bundle.ignore_index, **model_config.eval_protocol, accelerator=accelerator, metric=metric,
        )  # the protocol the export records, so evaluate_cps.py gives the same numbers; restores training mode
        collapse = collapsed_prediction(metric.confusion_matrix, bundle.class_names)  # summed over ranks
        if collapse:
            accelerator.print(f"warning: step {progress.step}: {collapse}")
            log.write({"step": progress.step, "collapse_warning": collapse})
        scores = {f"eval_{key}": value for key, value in results.items()}
        return (scores | {"collapse_warning": collapse}) if collapse else scores  # all_results.json keeps it

    def export_network(folder: Path, results: dict) -> None:
        """The evaluated network (network 1 for CPS, as the paper; the student for mean teacher, unless
        --export_network says otherwise) as a pipeline-ready folder with its model card."""
        if not accelerator.is_main_process:
            return
        exported = bare(networks[export_index])
        card = build_model_card(
            exported.config, results=results, dataset_name=args.dataset,
            dataset_type=args.dataset, protocol=args.labeled, method=args.method, backbone=args.backbone,
            split=args.val_split, training_args=args.to_dict(), repo_id=args.hub_model_id,
            exported_network=f"{method.names()[export_index]} (network {export_index + 1} of {len(networks)})",
        )
        export_model(exported, folder, card=card)

    # ---- loop ------------------------------------------------------------------------------
    for network in networks:
        network.train()
    bar = tqdm(total=max_train_steps, initial=progress.step, disable=not accelerator.is_local_main_process)
    window_start, window_images = time.perf_counter(), 0
    images_per_step = args.per_device_train_batch_size * (1 + method.num_unlabeled_streams) * accelerator.num_processes
    stop.arm(accelerator.num_processes == 1)  # Ctrl-C: stop after the step (and its checkpoint), not inside it
    while progress.step < max_train_steps:
        micro_logs, update = [], True
        for micro_step in range(args.gradient_accumulation_steps):
            batch = _to_device(next(streams), accelerator.device)
            with accelerator.accumulate(*trained):
                step_lrs = learning_rates(optimizer)  # the LRs this update uses (logged below)
                output = method(networks, batch, progress.step, rank=accelerator.process_index, micro_step=micro_step)
                micro_logs.append(output.logs)
                if update and not nonfinite.loss_is_finite(output.loss, output.logs, progress.step + 1):  # raises unless a skip is left
                    update = False
                    log.write({"step": progress.step + 1, "skipped_nonfinite_loss": True, **output.logs})
                    accelerator.print(f"step {progress.step + 1}: non-finite loss, no update "
                                      f"({progress.nonfinite_skipped} of {args.skip_nonfinite_steps} skips used)")
                accelerator.backward(output.loss)
                if update:  # a skipped step leaves the weights and optimizer state untouched
                    optimizer.step()
                    if accelerator.sync_gradients:  # an optimizer update happened: EMA teachers follow
                        method.after_optimizer_step([bare(n) for n in networks], progress.step)
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
        progress.step += 1
        window_images += images_per_step * args.gradient_accumulation_steps
        if alarm is not None:
            alarm.add_step(micro_logs)
        bar.update(1)

        if progress.step % args.logging_steps == 0 or progress.step == max_train_steps:
            elapsed = time.perf_counter() - window_start
            step_logs = reduce_logs(mean_logs(micro_logs), accelerator)  # this step, all micro-batches and ranks
            record = {
                "step": progress.step,
                "epoch": progress.step / max(steps_per_epoch, 1),
                **step_lrs,
                "images_per_second": window_images / max(elapsed, 1e-9),
                **step_logs,
            }
            if accelerator.device.type == "cuda":  # this rank's peak since the last log line
                record["max_memory_allocated_gib"] = torch.cuda.max_memory_allocated(accelerator.device) / 2**30
                torch.cuda.reset_peak_memory_stats(accelerator.device)
            alarms = []
            if alarm is not None:  # window means of the class shares replace the step's own
                shares, alarms = alarm.end_window(progress.step)
                record.update(reduce_logs(shares, accelerator))
            accelerator.log(record, step=progress.step)
            log.write(record)
            for message in alarms:
                accelerator.print(f"warning: {message}")
                log.write({"step": progress.step, "erasure_alarm": message})
            bar.set_postfix(loss=f"{step_logs.get('loss', float('nan')):.3f}")
            window_start, window_images = time.perf_counter(), 0

        pause_start = time.perf_counter()  # evaluation and checkpoints do not count against throughput
        if args.eval_steps and progress.step % args.eval_steps == 0 and progress.step < max_train_steps:
            latest_eval = run_evaluation()
            if progress.update_best(latest_eval["eval_mean_iou"], progress.step) and args.save_best_model:
                export_network(output_dir / "model_best", latest_eval)
            scalars = eval_scalars(latest_eval, bundle.class_names)
            accelerator.log(scalars, step=progress.step)
            log.write({"step": progress.step, **scalars})
            accelerator.print(f"step {progress.step}: eval_mean_iou {latest_eval['eval_mean_iou']:.4f}")

        if args.checkpointing_steps and progress.step % args.checkpointing_steps == 0:
            streams.set_positions_of_all_ranks(gather_object([streams.streamed_positions()]))  # saved by rank 0
            accelerator.save_state(str(output_dir / f"step_{progress.step}"))
            accelerator.wait_for_everyone()  # every rank's files are written before the folder counts
            if accelerator.is_main_process:
                mark_checkpoint_complete(output_dir / f"step_{progress.step}", progress.step)
                prune_checkpoints(output_dir, args.checkpoints_total_limit)
        window_start += time.perf_counter() - pause_start
        stop.check()
    stop.arm(False)
    bar.close()

    # ---- evaluation ------------------------------------------------------------------------
    final = run_evaluation()
    if progress.update_best(final["eval_mean_iou"], progress.step) and args.save_best_model:
        export_network(output_dir / "model_best", final)
    fingerprints = gather_object([parameter_fingerprint([bare(n) for n in networks])])
    in_sync = len(set(fingerprints)) == 1
    if not in_sync:
        raise RuntimeError(f"DDP ranks ended with different weights or buffers: {fingerprints}")
    results = {
        **final,
        "final_step": progress.step,
        "best_eval_mean_iou": progress.best_mean_iou,
        "best_step": progress.best_step,
        "method": args.method,
        "num_labeled": len(bundle.labeled),
        "num_unlabeled": _size(bundle.unlabeled),
        "num_processes": accelerator.num_processes,
        "nonfinite_steps_skipped": progress.nonfinite_skipped,
        "parameter_fingerprint": fingerprints[0],
        "num_parameters": num_parameters,
    }
    scalars = eval_scalars(final, bundle.class_names)
    accelerator.log(scalars, step=progress.step)
    log.write({"step": progress.step, **scalars})
    accelerator.print(
        f"final eval_mean_iou {final['eval_mean_iou']:.4f} (step {progress.step}); "
        f"best {progress.best_mean_iou:.4f} (step {progress.best_step})"
    )

    # ---- save and push ---------------------------------------------------------------------
    accelerator.wait_for_everyone()
    export_network(output_dir / "model", final)
    if args.export_ensemble:  # all networks of the run, softmax mean; evaluated on every rank (summed matrices)
        ensemble = [bare(n) for n in networks]
        ensemble_eval = {f"eval_{k}": v for k, v in evaluate_model(
            ensemble, val_set, num_labels=model_config.num_labels, ignore_index=bundle.ignore_index,
            **model_config.eval_protocol, accelerator=accelerator, average="softmax").items()}
        results["ensemble_eval_mean_iou"] = ensemble_eval["eval_mean_iou"]
        if accelerator.is_main_process:
            export_ensemble(ensemble, output_dir / "model_ensemble", network_names=list(method.names()),
                            results=ensemble_eval, dataset_name=args.dataset, dataset_type=args.dataset,
                            protocol=args.labeled, method=args.method, backbone=args.backbone,
                            split=args.val_split, training_args=args.to_dict(), repo_id=None)
    if accelerator.is_main_process:
        (output_dir / "all_results.json").write_text(json.dumps(results, indent=2, default=jsonable))
        if args.push_to_hub:
            push_model(output_dir / "model", args.hub_model_id, token=args.hub_token)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return results



if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(run_cli(main))
