"""Hub export: a pipeline-ready folder with a model card, and a push of exactly that folder.

Read top to bottom: what an exported folder holds, the model card (metadata with model-index
mIoU results, then the human-readable body), the export, then the push.

The exported folder is what `from_pretrained` and `pipeline("image-segmentation")` need and
nothing else: `config.json`, `model.safetensors`, `preprocessor_config.json` and `README.md`, plus
(by default) the three source files that let `trust_remote_code=True` load the model where cps_hf
is not installed. Pickle-based weights (`*.bin`, `*.pt`, ...) are never written and never pushed.
`export_ensemble` writes the same files for all of a run's networks as one
`CPSEnsembleForSemanticSegmentation` (softmax mean), beside the single-network export.
"""

from __future__ import annotations

import math
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from huggingface_hub import CommitOperationAdd, EvalResult, HfApi, ModelCard, ModelCardData
from transformers import PreTrainedModel

from .configuration_cps import CPSConfig, CPSEnsembleConfig
from .image_processing_cps import CPSImageProcessor
from .inference import describe_protocol, model_eval_protocol
from .modeling_cps import (
    CPSEnsembleForSemanticSegmentation,
    CPSForSemanticSegmentation,
    _bare_network,
    plain_vit_facts,
    vit_tap_indices,
)

# ---------------------------------------------------------------------------------------------
# What an exported folder holds
# ---------------------------------------------------------------------------------------------

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
WEIGHTS_INDEX_FILE = "model.safetensors.index.json"  # only when save_pretrained shards big models
PROCESSOR_FILE = "preprocessor_config.json"
CARD_FILE = "README.md"
# transformers' custom_object_save copies these (with `auto_map` entries) for trust_remote_code.
REMOTE_CODE_FILES = ("configuration_cps.py", "modeling_cps.py", "image_processing_cps.py")

# Files that can run code when loaded: refused outright, whatever else the folder holds.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")

PAPER_BIBTEX = """@inproceedings{chen2021cps,
  title     = {Semi-Supervised Semantic Segmentation with Cross Pseudo Supervision},
  author    = {Chen, Xiaokang and Yuan, Yuhui and Zeng, Gang and Wang, Jingdong},
  booktitle = {Proceedings of the IEEE/CVF Conference on Computer Vision and Pattern Recognition (CVPR)},
  year      = {2021}
}"""

CARD_TAGS = [
    "semantic-segmentation",
    "image-segmentation",
    "cps",
    "cross-pseudo-supervision",
    "semi-supervised",
    "deeplabv3plus",
    "timm",
    "cps_hf",
]


def _is_export_file(relative_path: str) -> bool:
    """The files `export_model` writes (a sharded save adds numbered `*.safetensors` and an index)."""
    if "/" in relative_path:
        return False
    return relative_path in (CONFIG_FILE, PROCESSOR_FILE, CARD_FILE, WEIGHTS_INDEX_FILE, *REMOTE_CODE_FILES) or (
        relative_path.endswith(".safetensors")
    )


def _files_under(folder: Path) -> list[str]:
    return sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file())


# ---------------------------------------------------------------------------------------------
# Model card
# ---------------------------------------------------------------------------------------------

# evaluate's mean_iou names; the Trainer-style `eval_` prefix is accepted too.
SCALAR_METRICS = {"mean_iou": "mIoU", "mean_accuracy": "mean accuracy", "overall_accuracy": "pixel accuracy"}


def _lookup(results: dict, name: str) -> Any:
    """`results[name]` or `results["eval_" + name]`; None when neither is there."""
    for key in (f"eval_{name}", name):
        if key in results and results[key] is not None:
            return results[key]
    return None


def _fraction(value: Any, field: str) -> float:
    """A metric as a plain float in [0, 1] (evaluate returns fractions; numpy floats are not YAML-safe)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"results[{field!r}] must be a number in [0, 1], got {value!r}") from None
    if not (0.0 <= number <= 1.0):
        raise ValueError(
            f"results[{field!r}] must be a fraction in [0, 1] (evaluate's mean_iou convention), got {number}"
        )
    return number


def _per_class_iou(results: dict, config: CPSConfig) -> list[float | None] | None:
    """Per-class IoU in class-id order; None for classes absent from predictions and labels (NaN)."""
    values = _lookup(results, "per_category_iou")
    if values is None:
        return None
    values = list(values)
    if len(values) != config.num_labels:
        raise ValueError(
            f"results['per_category_iou'] has {len(values)} entries but the config has {config.num_labels} classes"
        )
    per_class = []
    for class_id, value in enumerate(values):
        absent = value is None or (hasattr(value, "__float__") and math.isnan(float(value)))
        per_class.append(None if absent else _fraction(value, f"per_category_iou[{class_id}]"))
    return per_class


def _percent(fraction: float | None) -> str:
    return "n/a" if fraction is None else f"{100.0 * fraction:.2f}"


def _cell(value: Any) -> str:
    """A Markdown table cell: pipes escaped, newlines flattened."""
    return str(value).replace("|", "\\|").replace("\n", " ")


def _card_metadata(
    config: CPSConfig,
    metrics: dict[str, float],
    *,
    model_name: str,
    dataset_name: str,
    dataset_type: str,
    split: str,
    backbone: str,
    license: str | None,
) -> ModelCardData:
    eval_results = [
        EvalResult(
            task_type="image-segmentation",
            task_name="Semantic Segmentation",
            dataset_type=dataset_type,
            dataset_name=dataset_name,
            dataset_split=split,
            metric_type=name,
            metric_name=SCALAR_METRICS[name],
            metric_value=value,
        )
        for name, value in metrics.items()
    ]
    return ModelCardData(
        model_name=model_name,
        library_name="transformers",
        pipeline_tag="image-segmentation",
        license=license,
        tags=CARD_TAGS + [f"backbone:{backbone}"],
        datasets=[dataset_type],
        metrics=["mean_iou"],
        eval_results=eval_results or None,
    )


# Backbone weights whose licence is not the model's own choice: users of the card must see it.
BACKBONE_WEIGHT_LICENCES = (
    ("dinov3", "DINOv3 License (Meta's own terms, not Apache-2.0): read them before using or sharing the weights"),
    ("dinov2", "Apache-2.0 (DINOv2 weights, Meta)"),
)


def _backbone_licence_rows(*names: str) -> list[str]:
    """The licence row when the backbone (timm name or the card's display name) is one of those families."""
    for family, licence in BACKBONE_WEIGHT_LICENCES:
        if any(family in name.lower() for name in names):
            return [f"| Backbone weights licence | {_cell(licence)} |"]
    return []


def _architecture_rows(config: CPSConfig) -> tuple[str, str]:
    """How the backbone feeds the head: features_only levels (CNNs), ViT taps through the neck, or the DPT head."""
    vit = plain_vit_facts(config)
    if vit is None:
        stride = config.output_stride if config.output_stride is not None else "backbone default"
        return ("| Architecture | DeepLabv3+ (ASPP + decoder) on a timm `features_only` backbone |",
                f"| Output stride | {stride} |")
    taps = ", ".join(str(index) for index in vit_tap_indices(config, vit.depth))
    if config.decode_head == "dpt":
        return (f"| Architecture | DPT head (UniMatch V2's) on a plain ViT: normed outputs of blocks {taps}, "
                "reassembled at 4x, 2x, 1x and 1/2x the patch grid and fused coarse to fine |",
                f"| Output stride | {vit.patch_size[0]} (the patch size; inputs are padded to a multiple) |")
    return (f"| Architecture | DeepLabv3+ (ASPP + decoder) on a plain ViT: normed outputs of blocks {taps} "
            "through a simple feature-pyramid neck (4x transposed-conv upsampling + 1x1 fusion) |",
            f"| Output stride | {vit.patch_size[0]} (the patch size; inputs are padded to a multiple) |")


def _eval_protocol_rows(config: CPSConfig) -> list[str]:
    """The protocol behind the card's numbers, which `scripts/evaluate_cps.py` also uses by default."""
    protocol = model_eval_protocol(config)
    if protocol is None:
        return []
    return [f"| Evaluation protocol | {_cell(describe_protocol(protocol))}, single scale, no flip "
            "(`scripts/evaluate_cps.py` uses it by default) |"]


def _card_body(
    config: CPSConfig,
    metrics: dict[str, float],
    per_class: list[float | None] | None,
    *,
    model_name: str,
    dataset_name: str,
    protocol: str | None,
    method: str,
    backbone: str,
    split: str,
    training_args: dict | None,
    repo_id: str | None,
    remote_code: bool,
    exported_network: str | None = None,
    collapse_warning: str | None = None,
) -> str:
    model_ref = repo_id or "path/to/exported-model"
    ensemble_size = getattr(config, "ensemble_size", None)  # a CPSEnsembleConfig: all the run's networks
    if ensemble_size is None:
        holds = (f"This repository holds one network of the run: {exported_network}." if exported_network
                 else "This repository holds one of the two networks; either can be used at inference.")
        ensemble_rows = []
    else:
        names = list(getattr(config, "network_names", None) or [f"network_{k}" for k in range(1, ensemble_size + 1)])
        holds = (f"This repository holds all {ensemble_size} networks of the run ({', '.join(names)}) as one "
                 "model that averages their softmax probabilities: its `logits` are the log of that mean, so "
                 "the pipeline's argmax is the ensemble's prediction. (The paper evaluates network 1 alone.)")
        ensemble_rows = [f"| Networks | ensemble of {ensemble_size} (softmax mean): {_cell(', '.join(names))} |"]
    protocol_text = protocol or "fully supervised (all labels)"
    architecture_row, stride_row = _architecture_rows(config)
    lines = [
        f"# {model_name}",
        "",
        f"A DeepLabv3+ semantic segmentation network with a `{backbone}` backbone, trained on "
        f"**{dataset_name}** with **{method}** under the **{protocol_text}** labeled-data protocol.",
        "",
        "Cross Pseudo Supervision (CPS, Chen et al., CVPR 2021) trains two segmentation networks of the same "
        "architecture from different initialisations; each network's one-hot prediction (pseudo label) on "
        "unlabeled images supervises the other with cross-entropy, on top of the usual supervised loss on "
        f"labeled images. {holds}",
        "",
        "## Model details",
        "",
        "| | |",
        "|---|---|",
        f"| Method | {_cell(method)} |",
        f"| Labeled-data protocol | {_cell(protocol_text)} |",
        f"| Dataset | {_cell(dataset_name)} |",
        architecture_row,
        f"| Backbone | `{_cell(backbone)}` |",
        f"| Backbone initialisation | {_cell(config.backbone_pretrained_source or 'random')} |",
        *_backbone_licence_rows(config.backbone, backbone),
        stride_row,
        f"| ASPP rates | {', '.join(str(rate) for rate in config.aspp_rates)} |",
        f"| Classes | {config.num_labels} |",
        *([f"| Exported network | {_cell(exported_network)} |"] if exported_network else []),
        *ensemble_rows,
        *_eval_protocol_rows(config),
        "",
    ]

    if metrics:
        lines += [f"## Results ({_cell(dataset_name)}, `{_cell(split)}` split)", ""]
        lines += ["| Metric | Value (%) |", "|---|---|"]
        lines += [f"| {SCALAR_METRICS[name]} | {_percent(value)} |" for name, value in metrics.items()]
        lines.append("")
    if collapse_warning:  # the trainer's check of this evaluation (cps_hf.failures.collapsed_prediction)
        lines += [f"**Warning: at this evaluation {_cell(collapse_warning)}.**", ""]
    if per_class is not None:
        lines += ["### Per-class IoU", "", "| Id | Class | IoU (%) |", "|---|---|---|"]
        for class_id, iou in enumerate(per_class):
            lines.append(f"| {class_id} | {_cell(config.id2label.get(class_id, class_id))} | {_percent(iou)} |")
        lines += ["", "n/a: the class appears in neither the predictions nor the labels of this split.", ""]

    lines += [
        "## How to use",
        "",
        "The model is a native transformers model registered by the `cps_hf` package: import it once, "
        "then use the Auto classes or the pipeline (no `trust_remote_code`).",
        "",
        "```python",
        "import cps_hf  # registers the CPS config, model and image processor with transformers",
        "from transformers import pipeline",
        "",
        f'segmenter = pipeline("image-segmentation", model="{model_ref}", subtask="semantic")',
        'segments = segmenter("image.jpg")  # [{"label": ..., "mask": PIL image at the input size}, ...]',
        "```",
        "",
        *([
            "Without cps_hf installed (timm is still needed), the source files in this repository load it:",
            "",
            "```python",
            "from transformers import pipeline",
            "",
            f'segmenter = pipeline("image-segmentation", model="{model_ref}", subtask="semantic", '
            "trust_remote_code=True)",
            "```",
            "",
        ] if remote_code else []),
        "Or with the model and image processor directly:",
        "",
        "```python",
        "import torch",
        "import cps_hf",
        "from PIL import Image",
        "from transformers import AutoImageProcessor, AutoModelForSemanticSegmentation",
        "",
        f'processor = AutoImageProcessor.from_pretrained("{model_ref}")',
        f'model = AutoModelForSemanticSegmentation.from_pretrained("{model_ref}").eval()',
        'image = Image.open("image.jpg").convert("RGB")',
        "with torch.no_grad():",
        '    outputs = model(**processor(image, return_tensors="pt"))',
        "label_map = processor.post_process_semantic_segmentation(outputs, target_sizes=[image.size[::-1]])[0]",
        "```",
        "",
    ]

    if training_args:
        lines += ["## Training hyper-parameters", "", "| Hyper-parameter | Value |", "|---|---|"]
        lines += [f"| {_cell(key)} | {_cell(value)} |" for key, value in training_args.items()]
        lines.append("")

    lines += ["## Citation", "", "```bibtex", PAPER_BIBTEX, "```", ""]
    return "\n".join(lines)


def build_model_card(
    config: CPSConfig,
    *,
    results: dict | None = None,
    dataset_name: str,
    dataset_type: str,
    protocol: str | None,
    method: str,
    backbone: str | None = None,
    split: str = "val",
    training_args: dict | None = None,
    repo_id: str | None = None,
    license: str | None = None,
    remote_code: bool = True,
    exported_network: str | None = None,
) -> ModelCard:
    """The model card of an exported CPS model: model-index mIoU metadata plus a readable body.

    `results` uses evaluate's `mean_iou` keys (fractions in [0, 1]), with or without the
    Trainer's `eval_` prefix; the metadata keeps fractions, the body shows percentages.
    `remote_code` says whether the export carries the source files for `trust_remote_code=True`.
    `exported_network` says which of the run's networks this is (e.g. "student (network 1 of 2)").
    """
    if not dataset_name or not dataset_type:
        raise ValueError("build_model_card needs a non-empty dataset_name and dataset_type")
    if not method:
        raise ValueError("build_model_card needs a non-empty method (e.g. 'CPS' or 'CPS + CutMix')")
    backbone = backbone or config.backbone
    model_name = repo_id.split("/")[-1] if repo_id else f"cps-deeplabv3plus-{backbone}"

    results = dict(results or {})
    metrics = {}
    for name in SCALAR_METRICS:
        value = _lookup(results, name)
        if value is not None:
            metrics[name] = _fraction(value, name)
    per_class = _per_class_iou(results, config)
    if results and "mean_iou" not in metrics:
        raise ValueError(
            f"results has no 'mean_iou' (or 'eval_mean_iou') entry; keys given: {sorted(results)}"
        )

    card_data = _card_metadata(
        config,
        metrics,
        model_name=model_name,
        dataset_name=dataset_name,
        dataset_type=dataset_type,
        split=split,
        backbone=backbone,
        license=license,
    )
    body = _card_body(
        config,
        metrics,
        per_class,
        model_name=model_name,
        dataset_name=dataset_name,
        protocol=protocol,
        method=method,
        backbone=backbone,
        split=split,
        training_args=training_args,
        repo_id=repo_id,
        remote_code=remote_code,
        exported_network=exported_network,
        collapse_warning=results.get("collapse_warning"),
    )
    return ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n{body}")


# ---------------------------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------------------------


def export_model(
    model: PreTrainedModel,
    output_dir: str | os.PathLike,
    *,
    image_processor: CPSImageProcessor | None = None,
    card: ModelCard | None = None,
    remote_code: bool = True,
    **card_kwargs,
) -> Path:
    """Write a pipeline-ready folder: safetensors weights, config, image processor, model card.

    With `remote_code` (the default) the folder also holds the configuration, modeling and image
    processing source with `auto_map` entries, so `trust_remote_code=True` loads it without cps_hf;
    where cps_hf is imported, its registered classes are used and no remote code runs.

    Give either a ready `card` or the `build_model_card` keywords (dataset_name, dataset_type,
    protocol, method, results, ...). The folder must be new, empty, or a previous export: stray
    files (old `*.bin` checkpoints, optimizer states) would otherwise be pushed along with it.
    """
    if not isinstance(model, PreTrainedModel):
        raise TypeError(
            f"export_model needs a transformers PreTrainedModel, got {type(model).__name__} "
            "(unwrap DDP/accelerate wrappers first, e.g. accelerator.unwrap_model(model))"
        )
    if card is not None and card_kwargs:
        raise TypeError(f"export_model got both card= and model-card keywords {sorted(card_kwargs)}; give one")
    if card is None:
        if not card_kwargs:
            raise TypeError(
                "export_model needs a model card: pass card=build_model_card(...) or its keywords "
                "(dataset_name=..., dataset_type=..., protocol=..., method=..., results=...)"
            )
        card = build_model_card(model.config, remote_code=remote_code, **card_kwargs)

    output_dir = Path(output_dir)
    if output_dir.exists():
        stray = [name for name in _files_under(output_dir) if not _is_export_file(name)]
        if stray:
            raise FileExistsError(
                f"{output_dir} holds files that are not part of an export: {stray}; use an empty folder"
            )
    output_dir.mkdir(parents=True, exist_ok=True)

    processor = image_processor or CPSImageProcessor()
    with _auto_classes_registered(remote_code, model.config, processor):
        model.save_pretrained(output_dir)  # transformers 5 writes safetensors only
        processor.save_pretrained(output_dir)
    card.save(output_dir / CARD_FILE)
    return output_dir


def export_ensemble(
    networks,
    output_dir: str | os.PathLike,
    *,
    network_names: list[str] | None = None,
    image_processor: CPSImageProcessor | None = None,
    card: ModelCard | None = None,
    remote_code: bool = True,
    **card_kwargs,
) -> Path:
    """Write all of a run's networks as one pipeline-ready `CPSEnsembleForSemanticSegmentation` folder.

    `networks` are trained `CPSForSemanticSegmentation` networks of one architecture (DDP/compile
    wrappers are unwrapped; the weights are copied on the CPU, the networks are left untouched);
    `network_names` their names in the run (recorded in the config and the card). The folder holds
    the same files as `export_model`'s (the weights as `networks.<k>.*` in one `model.safetensors`)
    and `pipeline("image-segmentation", model=folder)` returns the argmax of the networks' mean
    softmax; with `remote_code`, `trust_remote_code=True` loads it without cps_hf. Give a ready
    `card` or `build_model_card`'s keywords, whose `results` should be the ensemble's own scores
    (`evaluate_model(networks, ..., average="softmax")`): the card is written for an ensemble.
    """
    networks = list(networks)
    if not networks:
        raise ValueError("export_ensemble needs at least one network")
    for network in networks:
        bare = _bare_network(network)
        if not isinstance(bare, CPSForSemanticSegmentation):
            raise TypeError(f"export_ensemble needs CPSForSemanticSegmentation networks, got {type(bare).__name__}")
    ensemble = CPSEnsembleForSemanticSegmentation.from_networks(networks, network_names).eval()
    return export_model(ensemble, output_dir, image_processor=image_processor, card=card, remote_code=remote_code,
                        **card_kwargs)


_MISSING = object()  # "the object had no auto_map of its own"


@contextmanager
def _auto_classes_registered(enabled: bool, *saved_objects):
    """transformers writes `auto_map` and copies a class's source on save only while the class is
    registered for an Auto class, and it leaves `auto_map` on the saved config and processor.
    Register for this export alone, then restore both (a later plain save stays plain)."""
    classes = {CPSConfig: "AutoConfig", CPSForSemanticSegmentation: "AutoModelForSemanticSegmentation",
               CPSEnsembleConfig: "AutoConfig", CPSEnsembleForSemanticSegmentation: "AutoModelForSemanticSegmentation",
               CPSImageProcessor: "AutoImageProcessor"}
    registered = {cls: cls.__dict__.get("_auto_class", None) for cls in classes}
    auto_maps = [(obj, obj.__dict__.get("auto_map", _MISSING)) for obj in saved_objects]
    try:
        if enabled:
            for cls, auto_class in classes.items():
                cls.register_for_auto_class(auto_class)
        yield
    finally:
        for cls, value in registered.items():
            cls._auto_class = value
        for obj, value in auto_maps:
            if value is _MISSING:
                obj.__dict__.pop("auto_map", None)
            else:
                obj.auto_map = value


# ---------------------------------------------------------------------------------------------
# Push
# ---------------------------------------------------------------------------------------------


def _export_operations(folder: Path) -> list[CommitOperationAdd]:
    """One add-operation per exported file; anything else in the folder is an error, not skipped."""
    if not folder.is_dir():
        raise NotADirectoryError(f"{folder} is not a folder written by export_model")
    files = _files_under(folder)
    pickles = [name for name in files if name.lower().endswith(PICKLE_SUFFIXES)]
    if pickles:
        raise ValueError(f"{folder} holds pickle-based files {pickles}: only safetensors weights are pushed")
    has_weights = WEIGHTS_FILE in files or WEIGHTS_INDEX_FILE in files
    if CONFIG_FILE not in files or not has_weights:
        missing = [name for name, ok in ((CONFIG_FILE, CONFIG_FILE in files), (WEIGHTS_FILE, has_weights)) if not ok]
        raise FileNotFoundError(f"{folder} lacks {missing}: export the model with cps_hf.hub.export_model first")
    unexpected = [name for name in files if not _is_export_file(name)]
    if unexpected:
        raise ValueError(
            f"{folder} holds files that are not part of an export: {unexpected}; "
            "push a folder written by export_model"
        )
    return [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(folder / name)) for name in files]


def push_model(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    commit_message: str = "Upload CPS model",
    revision: str | None = None,
):
    """Create (or reuse) the model repo and upload an exported folder in one commit.

    We build the add-operations ourselves and call `create_commit` rather than `upload_folder`:
    the folder is checked file by file first (no pickles, nothing unexpected), and one commit
    holds exactly the exported files (with hf_xet installed `upload_folder` may split a folder
    into several commits). Returns huggingface_hub's `CommitInfo`.
    """
    operations = _export_operations(Path(folder))
    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    if revision not in (None, "main"):
        api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
    return api.create_commit(
        repo_id=repo_id,
        repo_type="model",
        operations=operations,
        commit_message=commit_message,
        revision=revision,
    )


__all__ = ["build_model_card", "export_model", "export_ensemble", "push_model", "PAPER_BIBTEX"]
