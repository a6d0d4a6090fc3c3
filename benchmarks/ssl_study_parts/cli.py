"""What the study scripts' command lines share (benchmarks/ssl_study.py, benchmarks/msrc_study.py): the flags,
the command a report quotes, the setting with the user's overrides, and the docs folder as the page holding the summary links it."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from . import REPO


def add_study_arguments(parser: argparse.ArgumentParser, settings: dict, variants: dict, runs_help: str,
                        docs_default: str, block: str, fractions: bool, page: str) -> None:
    """The flags every study has; `fractions` adds --fractions (the synthetic study's label fractions); `page`
    is the page that holds the study's summary block (README.md, docs/study.md)."""
    parser.add_argument("--setting", choices=sorted(settings), default="full")
    parser.add_argument("--quick", action="store_true", help="same as --setting quick: checks the pipeline in minutes")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs in parallel, one torch thread each (2 on 2 idle cores)")
    parser.add_argument("--methods", nargs="+", choices=list(variants), help="a subset of the setting's methods")
    parser.add_argument("--seeds", nargs="+", type=int, help="instead of the setting's seeds")
    if fractions:
        parser.add_argument("--fractions", nargs="+", help="instead of the setting's label fractions, e.g. 1/8")
    parser.add_argument("--runs-dir", help=runs_help)
    parser.add_argument("--docs-dir", help=f"where the report goes (default: {docs_default} for the full setting)")
    parser.add_argument("--report-only", action="store_true", help="train nothing; report on the finished runs")
    parser.add_argument("--readme-fragment", action="store_true",
                        help=f"print summary.md (the block {page} holds) at the end")
    parser.add_argument("--update-readme", metavar="PAGE",
                        help=f"replace the marked {block} block in this page ({page}); its links are written from there")


def finish_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> argparse.Namespace:
    if args.quick:
        args.setting = "quick"
    if args.jobs < 1:
        parser.error(f"--jobs must be >= 1, got {args.jobs}")
    return args


OVERRIDES = ("methods", "seeds", "fractions")  # the setting's lists a flag may replace


def study_command(script: str, args, report: bool, lead: tuple[str, ...] = ()) -> str:
    """The command that makes (or, `report`, re-renders) a study: `lead` flags, setting and overrides, no
    --jobs for a report (--jobs changes the wall time only, never a result)."""
    parts = [f"python benchmarks/{script}", *lead]
    if args.setting == "quick":
        parts.append("--quick")
    elif args.setting != "full":
        parts.append(f"--setting {args.setting}")
    for key in OVERRIDES:
        if getattr(args, key, None):
            parts.append(f"--{key} " + " ".join(str(v) for v in getattr(args, key)))
    for key in ("runs_dir", "docs_dir"):
        if getattr(args, key):
            parts.append(f"--{key.replace('_', '-')} {getattr(args, key)}")
    parts.append("--report-only" if report else "--jobs 2")
    return " ".join(parts)


def chosen_setting(settings: dict, args) -> dict:
    """A copy of the chosen setting with the flags' overrides, supervised always first among the methods
    (every comparison is against it)."""
    setting = json.loads(json.dumps(settings[args.setting]))
    for key in OVERRIDES:
        if getattr(args, key, None):
            setting[key] = getattr(args, key)
    if "supervised" not in setting["methods"]:
        setting["methods"] = ["supervised", *setting["methods"]]
    return setting


def docs_link(docs_dir: Path, home: Path = REPO) -> str:
    """The docs folder as the page holding the summary block (in `home`) links it: relative where it can be."""
    try:
        return os.path.relpath(docs_dir, home)
    except ValueError:
        return str(docs_dir)
