"""The up-front data check: every file of every split, before the first training step.

Training decodes lazily, so a broken file deep in a large unlabeled pool used to stop a run
hours in, and a broken label of an unlabeled image (never decoded) went unnoticed. Here every
record of the labeled, unlabeled and val splits gets the header-only checks of
`validation.header_problems` and, when those pass, a decode of its label for values outside the
classes (`validation.label_value_problems`: such a value used to pass this check and stop the run
when the sample was drawn, or at the first evaluation), on a thread pool; all problems are collected, and the run stops
with one error listing them, or, with `skip_bad_samples`, drops the bad labeled/unlabeled
samples and lists each in a file. The result is cached under a fingerprint of the records'
paths, sizes and mtimes, so a resumed run with unchanged files only pays for the `os.stat`s.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator

import datasets
import numpy as np

from .bundle import DatasetBundle
from .errors import DatasetError
from .streams import _undecoded
from .validation import header_problems, label_value_problems

logger = logging.getLogger(__name__)

CHECK_VERSION = 2  # bump when the checks change what they find: old caches then miss (2: label values)
SKIPPABLE = ("labeled", "unlabeled")
SHOWN = 20
_BATCH = 1024


@dataclasses.dataclass(frozen=True)
class Problem:
    split: str
    index: int  # position in that split of the bundle given to preflight_check
    id: str
    file: str
    problem: str


def default_workers() -> int:
    """Threads: header reads wait on storage far more than on the CPU (network file systems)."""
    return min(32, 4 * (os.cpu_count() or 1))


def map_records(
    dataset: datasets.Dataset, function: Callable[[dict], Any], pool: ThreadPoolExecutor
) -> Iterator[tuple[int, dict, Any]]:
    """(index, undecoded record, function(record)) for every record, in order, `pool` working.

    Records come as `{"path", "bytes"}` dicts (`Image(decode=False)`), in batches, so an
    in-memory dataset is never held whole.
    """
    raw = _undecoded(dataset, ["image", "label", "id"])
    start = 0
    for batch in raw.iter(batch_size=_BATCH):
        rows = [dict(zip(batch, values)) for values in zip(*batch.values())]
        for offset, (row, result) in enumerate(zip(rows, pool.map(function, rows))):
            yield start + offset, row, result
        start += len(rows)


def _stamp(value: Any) -> str:
    """What identifies one file's content cheaply: path, size and mtime (or a hash of bytes)."""
    if isinstance(value, dict):
        if value.get("bytes") is not None:
            return "bytes:" + hashlib.blake2b(value["bytes"], digest_size=16).hexdigest()
        value = value.get("path")
    if value is None:
        return "-"
    if isinstance(value, (str, os.PathLike)):
        try:
            stat = os.stat(value)
        except OSError:
            return f"{value}:absent"
        return f"{value}:{stat.st_size}:{stat.st_mtime_ns}"
    return "array:" + hashlib.blake2b(np.asarray(value).tobytes(), digest_size=16).hexdigest()


def _record_stamp(row: dict) -> str:
    return f"{row.get('id')}|{_stamp(row['image'])}|{_stamp(row.get('label'))}"


def fingerprint(splits: dict[str, datasets.Dataset], pool: ThreadPoolExecutor, classes: str = "") -> str:
    """Hash of every record's id and files (path + size + mtime), per split, in order, and of the
    class count and ignore index the label values were checked against."""
    digest = hashlib.sha256(f"cps_hf data check v{CHECK_VERSION} {classes}".encode())
    for name, dataset in splits.items():
        digest.update(f"\n[{name}] {len(dataset)}".encode())
        for _, _, stamp in map_records(dataset, _record_stamp, pool):
            digest.update(b"\n" + stamp.encode())
    return digest.hexdigest()


def _record_problems(row: dict, require_label: bool, num_classes: int | None, ignore_index: int) -> list:
    """The header checks, then (when they pass and classes are known) the label's values."""
    found = header_problems(row, require_label=require_label)
    if not found and num_classes is not None:
        found = label_value_problems(row, num_classes, ignore_index)
    return found


def find_problems(splits: dict[str, datasets.Dataset], pool: ThreadPoolExecutor, num_classes: int | None = None,
                  ignore_index: int = 255) -> tuple[list[Problem], int]:
    """Every header-level problem of every record, and label values outside the `num_classes` classes
    (labeled, val and unlabeled records that carry a label), and the number of records checked."""
    problems, records = [], 0
    for name, dataset in splits.items():
        check = functools.partial(_record_problems, require_label=name != "unlabeled", num_classes=num_classes,
                                  ignore_index=ignore_index)
        for index, row, found in map_records(dataset, check, pool):
            records += 1
            problems += [Problem(name, index, str(row.get("id")), file, problem) for file, problem in found]
    return problems, records


def _read_cache(cache_file: Path | None, key: str) -> list[Problem] | None:
    if cache_file is None or not cache_file.is_file():
        return None
    try:
        cached = json.loads(cache_file.read_text())
        if cached.get("fingerprint") != key:
            return None
        return [Problem(**entry) for entry in cached["problems"]]
    except (OSError, ValueError, KeyError, TypeError):
        logger.warning("data check cache %s is unreadable; checking again", cache_file)
        return None


def _write_atomic(path: Path, text: str) -> None:
    """Write whole or not at all (a killed run, or ranks writing the same file, never leave half)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    temporary.write_text(text)
    temporary.replace(path)


def _error(problems: list[Problem], skip_bad_samples: bool, skipped_file: Path | None) -> DatasetError:
    """One error listing the count per split, the first SHOWN problems, and what to do."""
    if skip_bad_samples:  # only val problems are left to report
        problems = [p for p in problems if p.split == "val"]
    counts = Counter(p.split for p in problems)
    samples = len({(p.split, p.index) for p in problems})
    lines = [
        f"data check: {len(problems)} problem(s) in {samples} sample(s) "
        f"({', '.join(f'{split} {count}' for split, count in counts.items())}):"
    ]
    lines += [f"  [{p.split}] {p.file}: {p.problem}" for p in problems[:SHOWN]]
    if len(problems) > SHOWN:
        lines.append(f"  ... and {len(problems) - SHOWN} more")
    if skip_bad_samples:
        lines.append(
            "Bad val samples are never skipped (mIoU on a silently smaller val set would not be comparable): "
            "fix these files or remove them from the val split."
        )
    else:
        where = f" (each is then listed in {skipped_file})" if skipped_file else ""
        lines.append(
            "Fix these files, or pass --skip_bad_samples to train without the bad labeled/unlabeled samples"
            f"{where}; bad val samples must be fixed either way."
        )
    lines.append("scripts/check_dataset.py decodes every file in full and reports all problems.")
    return DatasetError("\n".join(lines))


def _skip(bundle: DatasetBundle, problems: list[Problem], skipped_file: Path | None) -> DatasetBundle:
    """The bundle without the bad labeled/unlabeled samples; each one written to `skipped_file`."""
    skipped = [p for p in problems if p.split in SKIPPABLE]
    if skipped_file is not None:
        _write_atomic(skipped_file, "".join(json.dumps(dataclasses.asdict(p)) + "\n" for p in skipped))
    kept = {}
    for split in SKIPPABLE:
        dataset = getattr(bundle, split)
        bad = {p.index for p in skipped if p.split == split}
        if not bad:
            continue
        kept[split] = dataset.select([i for i in range(len(dataset)) if i not in bad])
        if len(kept[split]) == 0:
            raise DatasetError(
                f"data check: all {len(dataset)} {split} samples have bad files; nothing is left to train on "
                f"(list in {skipped_file})"
            )
        logger.warning("data check: skipped %d of %d %s samples with bad files (list in %s)",
                       len(bad), len(dataset), split, skipped_file)
    return dataclasses.replace(bundle, **kept)


def preflight_check(
    bundle: DatasetBundle,
    cache_file: str | Path | None = None,
    skip_bad_samples: bool = False,
    skipped_file: str | Path | None = None,
    workers: int | None = None,
) -> DatasetBundle:
    """Check every file of `bundle` from headers; return it, or it without the bad samples.

    Default: any problem raises one DatasetError listing them. `skip_bad_samples`: bad labeled
    and unlabeled samples are dropped (a broken label of an unlabeled image drops the image too:
    the pair disagrees and either file may be the wrong one) and listed, one JSON line per
    problem, in `skipped_file`; bad val samples still raise. `cache_file` stores the result under
    a fingerprint of the records; unchanged files reuse it, skipping included. A streamed
    unlabeled pool cannot be listed up front and is left to the checks made while reading it.
    """
    cache_file = Path(cache_file) if cache_file is not None else None
    skipped_file = Path(skipped_file) if skipped_file is not None else None
    splits = {"labeled": bundle.labeled, "unlabeled": bundle.unlabeled, "val": bundle.val}
    if isinstance(bundle.unlabeled, datasets.IterableDataset):
        logger.info("data check: the unlabeled pool is streamed; its files are checked as they are read, not up front")
        del splits["unlabeled"]
    num_classes, ignore_index = bundle.num_classes, bundle.ignore_index
    with ThreadPoolExecutor(max_workers=workers or default_workers()) as pool:
        key = fingerprint(splits, pool, classes=f"{num_classes} classes, ignore {ignore_index}")
        problems = _read_cache(cache_file, key)
        if problems is not None:
            logger.info("data check: files unchanged since the check cached in %s (%d problem(s))",
                        cache_file, len(problems))
        else:
            start = time.perf_counter()
            problems, records = find_problems(splits, pool, num_classes, ignore_index)
            seconds = time.perf_counter() - start
            logger.info("data check: %d samples (%s) checked in %.1fs, %d problem(s)", records,
                        ", ".join(f"{name} {len(ds)}" for name, ds in splits.items()), seconds, len(problems))
            if cache_file is not None:
                _write_atomic(cache_file, json.dumps({
                    "fingerprint": key, "version": CHECK_VERSION, "records": records, "seconds": round(seconds, 3),
                    "problems": [dataclasses.asdict(p) for p in problems],
                }, indent=1))
    if not problems:
        return bundle
    if not skip_bad_samples or any(p.split == "val" for p in problems):
        raise _error(problems, skip_bad_samples, skipped_file)
    return _skip(bundle, problems, skipped_file)
