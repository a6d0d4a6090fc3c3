"""The erasure alarm: a warning, naming the class, when pseudo labels stop giving a class its share.

Pseudo labels confirm the majority, and a rare class can vanish from them while the mean IoU still rises
(on street scenes CPS took pedestrian from 24 to 0.5 IoU). Every step, the methods log each class's share of
the kept pseudo labels on unlabeled images (``pseudo_share_u/<class>``) and of the labeled pixels
(``labeled_share/<class>``; `cps_hf.methods.class_shares`). This averages them over each logging window,
puts the window means in the log record (so `make_figures.py` can plot them) with the ratio
``share_ratio/<class>`` = pseudo share / labeled share, and warns once per class when that ratio stays
below `fraction` (default 0.25) for `patience` windows in a row, for classes that hold at least
`min_labeled_share` of the labeled pixels (so a class with a handful of labeled pixels does not ring it).
Windows that end before `start_step` are logged but not judged: a network at the start of training
(from random weights above all) labels nearly everything as its largest class, which is no erasure yet.
The labeled share is the mean over the whole run so far, which steadies it; the pseudo share is the
window's own.
"""

from __future__ import annotations

from collections import defaultdict

PSEUDO, LABELED, RATIO = "pseudo_share_u/", "labeled_share/", "share_ratio/"


class ErasureAlarm:
    def __init__(self, fraction: float = 0.25, patience: int = 3, min_labeled_share: float = 0.001,
                 start_step: int = 0):
        if not 0 < fraction < 1:
            raise ValueError(f"the erasure alarm's fraction must be in (0, 1), got {fraction}")
        if patience < 1:
            raise ValueError(f"the erasure alarm's patience must be >= 1, got {patience}")
        self.fraction, self.patience, self.min_labeled_share = float(fraction), int(patience), float(min_labeled_share)
        self.start_step = int(start_step)
        self._window_sums: dict[str, float] = defaultdict(float)
        self._window_counts: dict[str, int] = defaultdict(int)
        self._labeled_sums: dict[str, float] = defaultdict(float)
        self._labeled_counts: dict[str, int] = defaultdict(int)
        self._low_windows: dict[str, int] = defaultdict(int)
        self.warned: set[str] = set()

    def add_step(self, step_logs: list[dict]) -> None:
        """One optimizer step's logs (one dict per micro-batch)."""
        for logs in step_logs:
            for key, value in logs.items():
                if key.startswith(PSEUDO):
                    self._window_sums[key] += value
                    self._window_counts[key] += 1
                elif key.startswith(LABELED):
                    self._labeled_sums[key] += value
                    self._labeled_counts[key] += 1

    def end_window(self, step: int) -> tuple[dict[str, float], list[str]]:
        """The window's record entries and the warnings it raises (each class once per run)."""
        record, warnings = {}, []
        for key, total in self._window_sums.items():
            record[key] = total / self._window_counts[key]
        labeled = {key: total / self._labeled_counts[key] for key, total in self._labeled_sums.items()}
        record.update(labeled)
        for key, labeled_share in labeled.items():
            name = key[len(LABELED):]
            pseudo = record.get(PSEUDO + name)
            if pseudo is None or labeled_share <= 0:
                continue
            ratio = pseudo / labeled_share
            record[RATIO + name] = ratio
            warning = self.judge(step, name, pseudo, labeled_share)
            if warning:
                warnings.append(warning)
        self._window_sums.clear()
        self._window_counts.clear()
        return record, warnings

    def judge(self, step: int, name: str, pseudo_share: float, labeled_share: float) -> str | None:
        """One class's window: the warning when this window makes `patience` low ones in a row (once per class).
        `benchmarks/erasure_alarm_replay.py` replays a run's logged windows through it."""
        if labeled_share < self.min_labeled_share or labeled_share <= 0 or step < self.start_step:
            return None
        ratio = pseudo_share / labeled_share
        self._low_windows[name] = self._low_windows[name] + 1 if ratio < self.fraction else 0
        if self._low_windows[name] < self.patience or name in self.warned:
            return None
        self.warned.add(name)
        return (f"erasure alarm at step {step}: class {name!r} has {100 * pseudo_share:.2f}% of the pseudo labels on "
                f"unlabeled images against {100 * labeled_share:.2f}% of the labeled pixels (x{ratio:.2f}, below "
                f"x{self.fraction:g} for {self._low_windows[name]} logging windows): the pseudo labels are erasing it. "
                "Its IoU is likely falling; consider a lower lambda, a confidence threshold, or more labels of it")
