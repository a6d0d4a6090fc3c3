"""Loads the repository's scripts and benchmarks (not an installed package) as modules for the tests."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load(relative_path: str, name: str | None = None, register: bool = False):
    """The module at ROOT / relative_path (e.g. "scripts/prepare_msrc.py"). `register`: kept in sys.modules
    under `name` and loaded only once (a study script that makes its parts importable as it loads)."""
    name = name or Path(relative_path).stem
    if register and name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, ROOT / relative_path)
    module = importlib.util.module_from_spec(spec)
    if register:
        sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
