#!/usr/bin/env python
"""Segment images with a trained model: one class-index mask and one coloured overlay per image.

    python scripts/predict.py --model outputs/demo/model --output_dir preds \
        --inputs demo_data/VOCdevkit/VOC2012/JPEGImages
    python scripts/predict.py --model user/cps-voc --inputs "photos/*.jpg" extra.png --output_dir preds \\
        --device cuda --batch_size 8 --mode slide --crop_size 512 --flip
    accelerate launch --num_processes 2 scripts/predict.py --model outputs/demo/model --inputs photos --output_dir preds

`--inputs` takes folders (their image files, not recursive), glob patterns (quote them) and files.
`--model` is a local model folder or a Hub id. The default protocol is the one the trainer evaluated
the model with (`eval_protocol` in its config.json), else the whole image at its own size; `--mode
slide --crop_size --stride --scales --flip` choose another of the paper's protocols (as in
scripts/evaluate_cps.py). The script prints which protocol it uses and where it came from. Up to `--batch_size` consecutive images of the same size share a batch;
an image of another size starts a new batch. Under `accelerate launch` each process predicts a
disjoint share of the images.

Output folder:
    OUT/masks/<stem>.png      the prediction: pixel value = class id (palette PNG, so viewers show colours;
                              16-bit greyscale for models with more than 256 classes)
    OUT/overlays/<stem>.png   the prediction's colours blended over the image
    OUT/manifest.jsonl        one JSON object per input, in input order: input, mask, overlay, width and
                              height (of the image as decoded, EXIF rotation applied, = the mask's),
                              classes (ids present), class_names; an image skipped with
                              --skip_unreadable has {"input", "skipped": why} instead

An unreadable image stops the run with an error naming it, unless `--skip_unreadable`. A mistake in
the arguments or the inputs is one line `error: ...` on stderr and exit status 2 (`--debug`: traceback).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
from pathlib import Path

import numpy as np

from cps_hf.cli import ArgumentParser, run_cli
from cps_hf.errors import UserInputError
from cps_hf.inference import (add_protocol_arguments, check_model_source, describe_protocol_choice,
                              load_segmentation_model, model_eval_protocol, predict_class_ids, protocol_for_model)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")


def parse_args(argv=None) -> argparse.Namespace:
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True, help="model folder or Hub id (a transformers segmentation model)")
    parser.add_argument("--inputs", required=True, nargs="+", help="image folders, glob patterns and/or image files")
    parser.add_argument("--output_dir", required=True, help="gets masks/, overlays/ and manifest.jsonl")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                        help="auto: CUDA when there is a GPU (one per process under accelerate launch), else the CPU")
    parser.add_argument("--batch_size", type=int, default=1, help="images per forward pass (same-size images only)")
    add_protocol_arguments(parser, "the whole image at its own size")
    parser.add_argument("--palette", choices=["voc", "cityscapes"], default="voc", help="mask and overlay colours")
    parser.add_argument("--alpha", type=float, default=0.5, help="overlay opacity of the prediction colours")
    parser.add_argument("--skip_unreadable", action="store_true",
                        help="skip images that cannot be decoded (listed in the manifest and printed), not stop")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        raise UserInputError(f"--batch_size must be at least 1, got {args.batch_size}")
    if not 0.0 <= args.alpha <= 1.0:
        raise UserInputError(f"--alpha must lie in [0, 1], got {args.alpha}")
    return args


# ---------------------------------------------------------------------- inputs
def _is_image_file(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES


def _expand(entry: str) -> list[Path]:
    """One --inputs entry as files: a folder's images (sorted), a glob's matches, or the file itself."""
    path = Path(entry).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if _is_image_file(p))
        if not files:
            raise UserInputError(f"--inputs {entry}: folder holds no image files ({', '.join(IMAGE_SUFFIXES)})")
        return files
    if glob.has_magic(entry):
        files = sorted(Path(p) for p in glob.glob(os.path.expanduser(entry), recursive=True) if Path(p).is_file())
        if not files:
            raise UserInputError(f"--inputs {entry}: pattern matches no files")
        return files
    if not path.exists():
        raise UserInputError(f"--inputs {entry}: no such file or folder")
    return [path]


def collect_inputs(entries: list[str]) -> list[Path]:
    """Every input file once, in the order given; two inputs with one stem would overwrite each other's outputs."""
    files = list(dict.fromkeys(file for entry in entries for file in _expand(entry)))
    stems: dict[str, Path] = {}
    for file in files:
        if file.stem in stems:
            raise UserInputError(f"--inputs: {stems[file.stem]} and {file} share the stem {file.stem!r}, so their "
                                 "outputs would overwrite each other; rename one or predict them in separate runs")
        stems[file.stem] = file
    return files


# ---------------------------------------------------------------------- device and protocol
def process_state(device: str):
    """(accelerate's process state: rank and world size, the device this process predicts on).

    A CPU run (`--device cpu`, ACCELERATE_USE_CPU, or no GPU) launched as several processes talks over gloo;
    a GPU run gives each process its own GPU."""
    import torch
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    if device == "cuda" and not torch.cuda.is_available():
        raise UserInputError("--device cuda: no CUDA device is visible here; use --device cpu or auto")
    on_cpu = device == "cpu" or (device == "auto" and (parse_flag_from_env("ACCELERATE_USE_CPU")
                                                       or not torch.cuda.is_available()))
    state = PartialState(cpu=on_cpu)
    if on_cpu:
        return state, torch.device("cpu")
    return state, torch.device("cuda", state.local_process_index % torch.cuda.device_count())


def protocol_from_args(args, model_protocol: dict | None = None) -> tuple[dict, str]:
    """(protocol, where it came from): the model's recorded eval_protocol, else the whole image at its
    own size, with any --mode/--crop_size/--stride given on top."""
    return protocol_for_model("folder", args.model, model_protocol, args.mode, args.crop_size, args.stride,
                              args.scales, args.flip, default_name="the whole image at its own size")


# ---------------------------------------------------------------------- prediction
def read_image(path: Path, skip_unreadable: bool):
    """RGB uint8 (H, W, 3), or why it cannot be read when skipping; otherwise an unreadable file stops the run."""
    from cps_hf.data import DatasetError
    from cps_hf.data.validation import decode_image

    try:
        return decode_image(str(path)), None
    except DatasetError as err:
        if not skip_unreadable:
            raise
        return None, str(err)


def same_size_batches(files: list[Path], batch_size: int, skip_unreadable: bool):
    """Yields ("batch", [(path, image), ...]) of consecutive same-size images and ("skipped", path, why)."""
    batch = []
    for path in files:
        image, why = read_image(path, skip_unreadable)
        if image is None:
            yield "skipped", path, why
            continue
        if batch and (len(batch) == batch_size or batch[0][1].shape != image.shape):
            yield "batch", batch
            batch = []
        batch.append((path, image))
    if batch:
        yield "batch", batch


def save_mask(mask: np.ndarray, path: Path, palette, num_labels: int) -> None:
    """Class ids as pixel values: a palette PNG (values = ids, shown in colour), 16-bit grey past 256 classes."""
    from PIL import Image

    from cps_hf.visualize import colorize

    if num_labels <= 256:
        colorize(mask, palette).save(path)
    else:
        Image.fromarray(mask.astype(np.uint16)).save(path)


def write_outputs(path: Path, image: np.ndarray, mask: np.ndarray, output_dir: Path, args, id2label) -> dict:
    """Mask and overlay of one image; its manifest record."""
    from cps_hf.visualize import overlay

    mask_path = output_dir / "masks" / f"{path.stem}.png"
    overlay_path = output_dir / "overlays" / f"{path.stem}.png"
    save_mask(mask, mask_path, args.palette, len(id2label))
    colours = np.where(mask <= 255, mask, 0)  # the overlay can only colour ids 0..255
    overlay(image, colours, args.palette, alpha=args.alpha, ignore_index=None).save(overlay_path)
    classes = [int(c) for c in np.unique(mask)]
    return {"input": str(path), "mask": str(mask_path), "overlay": str(overlay_path), "width": int(mask.shape[1]),
            "height": int(mask.shape[0]), "classes": classes,
            "class_names": [str(id2label.get(c, c)) for c in classes]}


def predict_shard(files: list[Path], model, mean, std, device, args, output_dir: Path,
                  protocol: dict) -> tuple[list[dict], str | None]:
    """This process's records, and the error that stopped it (reported by every process, so none waits forever)."""
    from cps_hf.data import DatasetError

    id2label = {int(k): v for k, v in model.config.id2label.items()}
    records = []
    try:
        for item in same_size_batches(files, args.batch_size, args.skip_unreadable):
            if item[0] == "skipped":
                records.append({"input": str(item[1]), "skipped": item[2]})
                continue
            batch = item[1]
            masks = predict_class_ids(model, [image for _, image in batch], mean, std, protocol, device)
            records += [write_outputs(p, image, m, output_dir, args, id2label) for (p, image), m in zip(batch, masks)]
    except DatasetError as err:
        return records, f"{err} (pass --skip_unreadable to skip such images)"
    return records, None


def share_of_process(files: list[Path], state) -> list[Path]:
    """This process's disjoint share of the inputs (every world-th file), so no image is predicted twice."""
    from cps_hf.inference import shard_for_process

    return list(shard_for_process(files, state.process_index, state.num_processes))


def gather_records(state, records: list[dict], error: str | None) -> tuple[list[dict], list[str]]:
    """Every process's records and errors, on every process."""
    if state.num_processes == 1:
        return records, [error] if error else []
    from accelerate.utils import gather_object

    shares = gather_object([(records, error)])
    return [r for share, _ in shares for r in share], [e for _, e in shares if e]


def in_input_order(records: list[dict], files: list[Path]) -> list[dict]:
    """Records back in --inputs order (processes took every world-th file)."""
    order = {str(path): index for index, path in enumerate(files)}
    return sorted(records, key=lambda record: order[record["input"]])


def write_manifest(records: list[dict], output_dir: Path) -> Path:
    path = output_dir / "manifest.jsonl"
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def main(argv=None) -> list[dict]:
    args = parse_args(argv)
    files = collect_inputs(args.inputs)
    check_model_source(args.model)  # mistakes in the arguments fail before accelerate starts and the model loads
    state, device = process_state(args.device)
    model, mean, std = load_segmentation_model(args.model, device)
    protocol, protocol_source = protocol_from_args(args, model_eval_protocol(model.config))
    if state.is_main_process:
        print(f"protocol: {describe_protocol_choice(protocol, protocol_source)}")
    output_dir = Path(args.output_dir)
    for folder in ("masks", "overlays"):
        (output_dir / folder).mkdir(parents=True, exist_ok=True)
    shard = share_of_process(files, state)
    records, errors = gather_records(state, *predict_shard(shard, model, mean, std, device, args, output_dir,
                                                           protocol))
    if state.num_processes > 1:  # every rank has every record: leave the group cleanly (gloo can abort at
        state.destroy_process_group()  # interpreter exit with the group still up)
    if errors:
        raise UserInputError(errors[0])  # on every process, so each exits with the same status
    records = in_input_order(records, files)
    if state.is_main_process:
        manifest = write_manifest(records, output_dir)
        for record in records:
            if "skipped" in record:
                print(f"skipped {record['input']}: {record['skipped']}")
        done = sum("skipped" not in r for r in records)
        print(f"wrote {done} masks and overlays under {output_dir} (manifest: {manifest})")
    return records


if __name__ == "__main__":
    sys.exit(run_cli(main))
