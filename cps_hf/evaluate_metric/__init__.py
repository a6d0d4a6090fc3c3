"""evaluate-loadable metric modules shipped with cps_hf (they load offline from these folders)."""

from pathlib import Path

MEAN_IOU_PATH = str(Path(__file__).resolve().parent / "mean_iou")

__all__ = ["MEAN_IOU_PATH"]
