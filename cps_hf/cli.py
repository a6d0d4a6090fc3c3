"""The scripts' entry point: a user's mistake is one line on stderr and exit status 2; Ctrl-C is one
line (`interrupted: ...`, where to continue from, for training) and exit status 130.

`--debug` (or CPS_HF_DEBUG=1) shows the full traceback instead. Under `accelerate launch`, each
process prints its own line; add `--quiet` to `accelerate launch` so the launcher does not add a
traceback of its own when the script exits non-zero (it then exits 1 itself).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Sequence

from .errors import RunInterrupted, UserInputError

DEBUG_FLAG = "--debug"
DEBUG_ENV = "CPS_HF_DEBUG"


def run_cli(main: Callable[[list[str]], object], argv: Sequence[str] | None = None) -> int:
    """Run `main(argv)`; its exit status (an int it returns, else 0), or 2 with one `error: ...` line
    for a `UserInputError`. `--debug` is taken from before any `--` (what follows belongs to others)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    own = argv.index("--") if "--" in argv else len(argv)
    debug = DEBUG_FLAG in argv[:own] or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    argv = [arg for arg in argv[:own] if arg != DEBUG_FLAG] + argv[own:]
    world = int(os.environ.get("WORLD_SIZE", "1"))
    where = f" (rank {os.environ.get('RANK', '?')})" if world > 1 else ""
    try:
        result = main(argv)
    except UserInputError as error:
        if debug:
            raise
        _close_progress_bars()
        label = "interrupted" if isinstance(error, RunInterrupted) else "error"
        print(f"{label}{where}: {error}", file=sys.stderr, flush=True)
        return getattr(error, "exit_status", 2)
    except KeyboardInterrupt:
        if debug:
            raise
        _close_progress_bars()
        print(f"interrupted{where}", file=sys.stderr, flush=True)
        return 130
    return result if isinstance(result, int) and not isinstance(result, bool) else 0


def _close_progress_bars() -> None:
    """End any live tqdm bar's line, so the message starts a line of its own (a bar leaves the cursor after it)."""
    tqdm_module = sys.modules.get("tqdm.std")
    if tqdm_module is None:
        return
    for bar in list(getattr(tqdm_module.tqdm, "_instances", ())):
        bar.close()


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions as written; each option's help ends with its default unless the help already names it
    (or there is none: required options, flags that are off unless given)."""

    def _get_help_string(self, action):
        text = action.help or ""
        if (not action.option_strings or action.default is None or action.default is False
                or action.default == argparse.SUPPRESS
                or "%(default)" in text or "default" in text.lower()):
            return text
        return f"{text} (default: %(default)s)"


class ArgumentParser(argparse.ArgumentParser):
    """The scripts' parser: `HelpFormatter`, and a mistake in the flags is one `UserInputError` line (exit 2
    through `run_cli`) instead of argparse's usage block."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message):
        raise UserInputError(f"{message} (see {self.prog} --help)")
