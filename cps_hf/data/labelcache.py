"""One-time conversion of label files whose values need a lookup (Cityscapes labelIds ->
trainIds, a custom ignore index -> 255).

Loaders return plain `datasets.Dataset`s whose label column points at files that already hold
the final class indices, so any consumer (our transforms, `with_transform`, evaluation code)
reads correct labels without knowing about the mapping. Converted files go to a cache folder
(never into the user's tree) and are reused while newer than their source.
"""

from __future__ import annotations

import hashlib
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from .validation import decode_label

logger = logging.getLogger(__name__)


def default_label_cache_dir() -> Path:
    from datasets import config

    return Path(os.environ.get("CPS_HF_LABEL_CACHE", Path(config.HF_CACHE_HOME) / "cps_hf" / "labels"))


def _convert_one(source: str, target: Path, table: np.ndarray) -> None:
    if target.exists() and target.stat().st_mtime >= Path(source).stat().st_mtime:
        return
    label = decode_label(source)
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_suffix(".tmp.png")
    Image.fromarray(table[label]).save(temporary, compress_level=1)
    temporary.replace(target)  # atomic: a killed run never leaves a half-written label behind


def remap_label_files(
    sources: list[str], table: np.ndarray, tag: str, cache_dir: str | Path | None = None, common_root: str | None = None
) -> list[str]:
    """Write `table[label]` for each source label into the cache; return the new paths.

    `tag` names the mapping (e.g. "cityscapes-trainid"); the cache sub-folder also hashes the
    table and the source root, so different mappings or trees never share files.
    """
    if not sources:
        return []
    root = Path(common_root or os.path.commonpath([os.path.dirname(s) for s in sources])).resolve()
    digest = hashlib.sha1(table.tobytes() + str(root).encode()).hexdigest()[:12]
    out_root = Path(cache_dir or default_label_cache_dir()) / f"{tag}-{digest}"
    targets = [out_root / Path(s).resolve().relative_to(root) for s in sources]
    todo = [(s, t) for s, t in zip(sources, targets) if not t.exists()]
    if todo:
        logger.info("Converting %d label files (%s) into %s (once; reused afterwards)", len(todo), tag, out_root)
    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
        list(pool.map(lambda pair: _convert_one(pair[0], pair[1], table), zip(sources, targets)))
    return [str(t) for t in targets]
