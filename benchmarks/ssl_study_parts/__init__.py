"""The parts of benchmarks/ssl_study.py, one job per file, so each can be read (and changed) alone.

    settings.py   what the study is: the methods (VARIANTS), the settings table, label fractions
    runner.py     the run folders: planning, resuming, training processes, the generated data
    aggregate.py  numbers from finished runs: scores, paired differences, cost, labeled objects
    markdown.py   results.md, summary.md (docs/study.md's section) and replacing the marked block in a page
    figures.py    miou_vs_labels.png and predictions.png
    report.py     all of the above for one study, into its docs folder (results.md, ..., study.json)

benchmarks/ssl_study.py is the command line; this package is not installed: the script finds it beside
itself. Here: the repository root, the study's printing and the loader for scripts/ modules, shared by
the parts.
"""

from __future__ import annotations

import importlib.util
import sys
import threading
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _load_script(name: str):
    """A module from scripts/ (not a package), e.g. compare_methods for its runner's conventions."""
    key = f"_ssl_study_{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, REPO / "scripts" / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


_PRINT_LOCK = threading.Lock()


def say(message: str) -> None:
    with _PRINT_LOCK:
        print(message, flush=True)

