"""What a run does when it goes wrong, so that it never looks finished when it is not.

- `NonFiniteGuard`: a NaN/inf loss stops the run at that step, naming the loss terms; with
  `--skip_nonfinite_steps N` up to N such steps are skipped (no parameter update) and logged.
- `check_finite_state`: no network with a NaN/inf weight or BN statistic is evaluated or exported.
- `failure_marker`: a run that raises leaves `FAILED.json` (the error, when, the last complete
  checkpoint) in its output folder; a run that finishes removes a stale one.
- `collapsed_prediction`: an evaluation where one class covers nearly every scored pixel, far beyond
  its share of the truth, is named (the trainer prints and logs it), since the loss does not show it.
"""

from __future__ import annotations

import json
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Iterable

import torch
from torch import nn

from .errors import UserInputError

FAILED_MARKER = "FAILED.json"


class InterruptAtStepEnd:
    """Ctrl-C during training stops the run between two steps, not inside one.

    A KeyboardInterrupt raised at an arbitrary point (in a library holding a lock, halfway through a
    checkpoint write) can leave a process that never exits. While `armed`, the first SIGINT only sets
    `requested`; the loop calls `check()` once a step (and its checkpoint) is complete, which raises the
    KeyboardInterrupt there. A second Ctrl-C interrupts at once. Unarmed (before and after the loop, and in
    multi-process runs, whose ranks must stop at the same step), Ctrl-C interrupts at once as usual.
    Installed by `deferred_interrupt`; the previous handler comes back when it ends.
    """

    def __init__(self):
        self.armed = False
        self.requested = False

    def handle(self, signum, frame) -> None:
        if not self.armed or self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def arm(self, enabled: bool = True) -> None:
        self.armed = bool(enabled)

    def check(self) -> None:
        if self.requested:
            raise KeyboardInterrupt


@contextmanager
def deferred_interrupt():
    """An `InterruptAtStepEnd` handling SIGINT for the block (in the main thread; elsewhere it only records)."""
    import signal
    import threading

    stop = InterruptAtStepEnd()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = signal.signal(signal.SIGINT, stop.handle)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


class NonFiniteLossError(UserInputError, RuntimeError):
    """The loss became NaN or infinite: the run diverged (its settings need changing) or a batch is broken."""


class NonFiniteStateError(UserInputError, RuntimeError):
    """A network holds NaN or infinite weights or statistics."""


def _format_terms(logs: dict) -> str:
    return ", ".join(f"{name}={value:.4g}" for name, value in logs.items() if name.startswith("loss"))


class NonFiniteGuard:
    """Decides, identically on every rank, whether this step's loss may update the networks.

    The non-finite flag is summed over ranks so that no rank steps while another skips (their
    weights would drift apart). The number of skips so far travels with the checkpoints through
    the `TrainProgress` object that holds it.
    """

    def __init__(self, max_skips: int, accelerator, progress):
        self.max_skips = max_skips
        self.accelerator = accelerator
        self.progress = progress

    def loss_is_finite(self, loss: torch.Tensor, logs: dict, step: int) -> bool:
        bad = (~torch.isfinite(loss.detach())).float().reshape(1)
        if self.accelerator.num_processes > 1:
            bad = self.accelerator.reduce(bad, reduction="sum")
        if not bad.item():
            return True
        if self.progress.nonfinite_skipped >= self.max_skips:
            budget = f"all {self.max_skips} allowed skips are used; " if self.max_skips else ""
            raise NonFiniteLossError(
                f"step {step}: the loss is not finite on {int(bad.item())} process(es) ({_format_terms(logs)}); "
                f"{budget}the run is stopped and no model is exported. Lower --learning_rate, check the data, "
                "resume from the last checkpoint, or pass --skip_nonfinite_steps N to skip up to N such steps"
            )
        self.progress.nonfinite_skipped += 1
        return False


def nonfinite_tensors(networks: Iterable[nn.Module]) -> list[str]:
    """Names (network index: tensor) of floating-point parameters and buffers holding NaN or inf."""
    found = []
    for index, network in enumerate(networks, start=1):
        for name, tensor in [*network.named_parameters(), *network.named_buffers()]:
            if tensor.is_floating_point() and not torch.isfinite(tensor).all():
                found.append(f"network {index}: {name}")
    return found


def check_finite_state(networks: Iterable[nn.Module], when: str) -> None:
    bad = nonfinite_tensors(networks)
    if bad:
        raise NonFiniteStateError(
            f"{when}: {len(bad)} tensor(s) hold NaN or inf, e.g. {', '.join(bad[:3])}; the run diverged, "
            "so nothing is exported. Lower --learning_rate or resume from an earlier checkpoint"
        )


COLLAPSE_SHARE = 0.9  # one class predicted on at least this share of the scored pixels ...
COLLAPSE_TRUE_SHARE = 0.5  # ... while the truth gives it at most this share


def collapsed_prediction(confusion_matrix, class_names: list[str] | None = None) -> str | None:
    """A warning when one class takes >= 90% of the predicted pixels but <= 50% of the true ones, else None.

    Seen on MSRC-21 (docs/methods.md, mean teacher + CutMix with a frozen-BN encoder): the encoder's
    features became constant across images, so the network predicted one class everywhere in eval mode
    (pixel accuracy 0.0) while the training loss, computed with batch statistics, looked ordinary.
    `confusion_matrix` is (reference x prediction) over the scored pixels, as `MeanIoU` holds it.
    """
    matrix = torch.as_tensor(confusion_matrix).double()
    total = float(matrix.sum())
    if total <= 0:
        return None
    predicted, true = matrix.sum(0) / total, matrix.sum(1) / total
    top = int(predicted.argmax())
    if predicted[top] < COLLAPSE_SHARE or true[top] > COLLAPSE_TRUE_SHARE:
        return None
    name = class_names[top] if class_names and top < len(class_names) else f"class {top}"
    return (f"the network predicts {name!r} on {predicted[top]:.0%} of the scored pixels, where the truth has "
            f"{true[top]:.0%}: it has collapsed to one class (in eval mode; the training loss does not show it). "
            "See 'collapse' in docs/methods.md: check --freeze_bn, lower --learning_rate, or resume an earlier checkpoint")


def _last_complete_checkpoint(output_dir: Path) -> str | None:
    from .training import complete_step_folders  # training imports the model: keep this module light

    folders = complete_step_folders(output_dir)
    return folders[-1].name if folders else None


@contextmanager
def failure_marker(output_dir: str | Path, enabled: bool = True):
    """Write FAILED.json when the block raises (then re-raise); remove a stale one when it succeeds."""
    from .run_folder import RunFolderRefused  # the folder is another run's (or unwritable): never write there

    marker = Path(output_dir) / FAILED_MARKER
    try:
        yield
    except BaseException as error:
        if enabled and not isinstance(error, (SystemExit, RunFolderRefused)):
            output = Path(output_dir)
            interrupted = isinstance(error, KeyboardInterrupt)
            try:
                output.mkdir(parents=True, exist_ok=True)
                marker.write_text(json.dumps({
                    "status": "interrupted" if interrupted else "failed",
                    "error": f"{type(error).__name__}: {error}",
                    "time": time.strftime("%Y-%m-%d %H:%M:%S %z"),
                    "last_complete_checkpoint": _last_complete_checkpoint(output),
                    "traceback": traceback.format_exception(error)[-3:],
                }, indent=2) + "\n")
            except OSError:  # an unwritable folder must not hide the error that stopped the run
                pass
        raise
    else:
        if enabled:
            marker.unlink(missing_ok=True)
