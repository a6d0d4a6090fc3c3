"""Data for cps_hf: loaders, partition protocols, the paper's transforms and training streams.

Loaders return `datasets.Dataset`s with columns image (RGB), label (class indices) and id;
`build_datasets` partitions them; `preflight_check` checks every file of them up front;
`TrainStreams` turns them into the infinite, resumable, sharded labeled + unlabeled batches the
trainer consumes.
"""

from .bundle import DatasetBundle, build_datasets
from .classes import (
    CITYSCAPES_CLASSES,
    CITYSCAPES_LABELID_TO_TRAINID,
    CITYSCAPES_PALETTE,
    IGNORE_INDEX,
    VOC_CLASSES,
    ClassSpec,
    read_classes_json,
    voc_palette,
)
from .demo import DEMO_CLASSES, make_demo_voc
from .errors import DatasetError
from .loaders import (
    class_spec_of,
    load_cityscapes,
    load_hub_dataset,
    load_image_folder,
    load_unlabeled_stream,
    load_voc,
)
from .partitions import split_labeled
from .preflight import preflight_check
from .protocols import available_protocols, get_protocol, read_id_list
from .streams import TrainStreams
from .study_scenes import STUDY_CLASSES, make_study_voc
from .transforms import PAPER_SCALES, EvalTransform, TrainTransform

__all__ = [
    "CITYSCAPES_CLASSES",
    "CITYSCAPES_LABELID_TO_TRAINID",
    "CITYSCAPES_PALETTE",
    "DEMO_CLASSES",
    "IGNORE_INDEX",
    "PAPER_SCALES",
    "STUDY_CLASSES",
    "VOC_CLASSES",
    "ClassSpec",
    "DatasetBundle",
    "DatasetError",
    "EvalTransform",
    "TrainStreams",
    "TrainTransform",
    "available_protocols",
    "build_datasets",
    "class_spec_of",
    "get_protocol",
    "load_cityscapes",
    "load_hub_dataset",
    "load_unlabeled_stream",
    "load_image_folder",
    "load_voc",
    "make_demo_voc",
    "make_study_voc",
    "preflight_check",
    "read_classes_json",
    "read_id_list",
    "split_labeled",
    "voc_palette",
]
