"""Optimizer and learning-rate schedule of CPS.

The original trains each branch with its own SGD (momentum 0.9, same LR for backbone and head,
no weight decay on BN parameters and biases) and a per-iteration poly schedule. Here both
networks share ONE optimizer with per-network parameter groups: the update is the same, and
under fp16 one optimizer means one GradScaler step, so an overflow in one network cannot
corrupt the other's update (two optimizers share the scaler's state).

Modern encoders (ConvNeXt, DINOv2 ViTs) are usually fine-tuned differently: AdamW, a small
encoder LR with a larger head LR (`head_lr_multiplier`), optionally layer-wise LR decay inside
the encoder (`layer_decay`), and a linear warm-up. Those are options; at their defaults the
parameter groups, their order and every number are the original's, so old checkpoints resume.
"""

from __future__ import annotations

from typing import Iterable, Literal, Sequence

import torch
import torch.nn as nn
from transformers import get_polynomial_decay_schedule_with_warmup
from transformers.trainer_pt_utils import get_parameter_names

# Every torch normalisation layer (BatchNorm*, SyncBatchNorm, InstanceNorm* derive from _NormBase;
# timm's BatchNormAct2d / LayerNorm2d / GroupNorm derive from these).
NORM_LAYER_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)

BACKBONE_PREFIX = "backbone."  # the encoder; everything else (decode_head.*, a ViT's neck.*) is the head

# create_model arguments that only the features_only wrapper (or CPS's own taps) understands
_FEATURE_ONLY_KWARGS = frozenset({"out_indices", "output_stride", "feature_cls", "feature_cfg", "features_only",
                                  "pretrained_cfg_overlay"})


def _timm_model(backbone: nn.Module) -> tuple[nn.Module, str] | None:
    """The timm model inside a features wrapper (FeatureGetterNet keeps it as `.model`), with the
    prefix of its parameter names in the backbone; None for wrappers that rebuilt the model
    (FeatureListNet) and so lost its methods."""
    for module, prefix in ((backbone, ""), (getattr(backbone, "model", None), "model.")):
        if isinstance(module, nn.Module) and hasattr(module, "group_matcher"):
            return module, prefix
    return None


def decay_parameter_names(model: nn.Module) -> set[str]:
    """Names of the parameters that get weight decay: everything but norm-layer params and biases,
    1-D parameters (ConvNeXt's and DINOv2's layer-scale `gamma`), and the tensors the timm encoder
    lists in `no_weight_decay()` (a ViT's position embedding and class/register tokens), as timm,
    BEiT and ConvNeXt fine-tune. The ResNet, HRNet and MobileNet encoders of the presets have no
    1-D parameter outside norms and biases and list nothing, so their groups are the original's."""
    names = get_parameter_names(model, NORM_LAYER_TYPES)
    excluded = {name for name, param in model.named_parameters() if param.ndim <= 1}
    found = _timm_model(model.backbone) if isinstance(getattr(model, "backbone", None), nn.Module) else None
    if found is not None and hasattr(found[0], "no_weight_decay"):
        excluded |= {f"{BACKBONE_PREFIX}{found[1]}{name}" for name in found[0].no_weight_decay()}
    return {name for name in names if not name.endswith("bias") and name not in excluded}


def backbone_layer_scales(model: nn.Module, layer_decay: float) -> dict[str, float]:
    """LR scale of every trainable `backbone.*` parameter under layer-wise LR decay, from timm.

    timm's `param_groups_layer_decay` (BEiT's recipe) is run on the encoder's classification model
    built on the meta device (no memory, no download): its `group_matcher()` numbers the stem,
    the blocks and the final norm 0..L, and a parameter of layer i gets `layer_decay ** (L - i)`.
    The backbone's parameter names are mapped to that model's by timm's own features-wrapper
    naming (`model.` prefix of FeatureGetterNet, `stages_0` for `stages.0` in FeatureListNet);
    an encoder whose names cannot all be mapped is refused rather than decayed at random.
    """
    import timm
    from timm.models._features import _module_list
    from timm.optim import param_groups_layer_decay

    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "backbone"):
        raise ValueError("layer_decay needs CPS networks (a `config.backbone` timm name)")
    kwargs = {k: v for k, v in (config.backbone_kwargs or {}).items() if k not in _FEATURE_ONLY_KWARGS}
    with torch.device("meta"):
        reference = timm.create_model(config.backbone, pretrained=False, **kwargs)
    if not hasattr(reference, "group_matcher"):
        raise ValueError(f"--layer_decay: timm's {config.backbone!r} has no group_matcher(), so its layers are unknown")
    scale_of = {}
    reference_ids = {id(p): name for name, p in reference.named_parameters()}
    for group in param_groups_layer_decay(reference, weight_decay=0.0, layer_decay=layer_decay):
        for param in group["params"]:
            scale_of[reference_ids[id(param)]] = group["lr_scale"]
    flattened = {new: old for new, old, _ in _module_list(reference, flatten_sequential=True)}

    scales = {}
    for name, param in model.named_parameters():
        if not (param.requires_grad and name.startswith(BACKBONE_PREFIX)):
            continue
        local = name[len(BACKBONE_PREFIX):]
        head, _, rest = local.partition(".")
        candidates = (local, local.removeprefix("model."), f"{flattened.get(head, head)}.{rest}")
        match = next((candidate for candidate in candidates if candidate in scale_of), None)
        if match is None:
            raise ValueError(
                f"--layer_decay: backbone parameter {name!r} has no counterpart in timm's {config.backbone!r}, so its "
                "layer is unknown; layer-wise LR decay is not supported for this encoder (drop --layer_decay)"
            )
        scales[name] = scale_of[match]
    return scales


def build_optimizer(
    models: Iterable[nn.Module],
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    no_decay_on_norm_and_bias: bool = True,
    optimizer: Literal["sgd", "adamw"] = "sgd",
    head_lr_multiplier: float = 1.0,
    layer_decay: float | None = None,
    betas: Sequence[float] = (0.9, 0.999),
) -> torch.optim.Optimizer:
    """One optimizer over all `models`; every trainable parameter in exactly one named group.

    Frozen parameters (requires_grad False) are left out. At `head_lr_multiplier=1` and no
    `layer_decay` (the paper's setting, whatever the optimizer): two groups per model,
    "model{i}_decay" and "model{i}_no_decay", all at `lr` (no 10x head LR, as the original).

    With a head multiplier or layer decay, per model: "model{i}_backbone_decay",
    "model{i}_backbone_no_decay" (with layer decay one pair per encoder layer k,
    "model{i}_backbone_layer{k}_decay" ..., lowest layer first), then "model{i}_head_decay",
    "model{i}_head_no_decay". Each has an explicit `lr` = lr x `lr_scale` (the head's scale is
    `head_lr_multiplier`; "head" is every parameter outside `backbone.*`). The schedule multiplies
    each group's own initial lr, so the ratios hold through warm-up and decay.

    `optimizer`: "sgd" (with `momentum`) or "adamw" (torch.optim.AdamW with `betas`, decoupled
    weight decay from each group; `momentum` unused).

    `weight_decay` default 5e-4 is the paper's stated value; the original code's effective value
    is 4e-4 (VOC, 4 GPUs) / 8e-4 (Cityscapes, 8 GPUs) at lr 0.0025, see the facts note.
    """
    if optimizer not in ("sgd", "adamw"):
        raise ValueError(f"build_optimizer: optimizer must be 'sgd' or 'adamw', got {optimizer!r}")
    split = head_lr_multiplier != 1.0 or layer_decay is not None
    groups = []
    seen: set[int] = set()
    for index, model in enumerate(models):
        decay_names = decay_parameter_names(model) if no_decay_on_norm_and_bias else None
        layer_scales = backbone_layer_scales(model, layer_decay) if layer_decay is not None else {}
        layer_of = {scale: k for k, scale in enumerate(sorted(set(layer_scales.values())))}
        model_groups: dict[tuple, dict] = {}
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            if id(param) in seen:
                raise ValueError(
                    f"build_optimizer: parameter {name!r} of model {index} is shared with an earlier model; "
                    "CPS needs two independent networks"
                )
            seen.add(id(param))
            decays = decay_names is None or name in decay_names
            suffix = "decay" if decays else "no_decay"
            if not split:
                key, group_name, scale = (0, 0, suffix), f"model{index}_{suffix}", None
            elif not name.startswith(BACKBONE_PREFIX):
                key, group_name, scale = (1, 0, suffix), f"model{index}_head_{suffix}", head_lr_multiplier
            elif layer_decay is not None:
                scale = layer_scales[name]
                layer = layer_of[scale]
                key, group_name = (0, layer, suffix), f"model{index}_backbone_layer{layer}_{suffix}"
            else:
                key, group_name, scale = (0, 0, suffix), f"model{index}_backbone_{suffix}", 1.0
            if key not in model_groups:
                model_groups[key] = {"name": group_name, "params": [], "weight_decay": weight_decay if decays else 0.0}
                if scale is not None:
                    model_groups[key].update(lr=lr * scale, lr_scale=scale)
            model_groups[key]["params"].append(param)
        # Encoder layers from the lowest, then the head; "decay" before "no_decay" (the original order)
        order = sorted(model_groups, key=lambda key: (key[0], key[1], key[2] != "decay"))
        groups.extend(model_groups[key] for key in order)
    groups = [group for group in groups if group["params"]]
    if not groups:
        raise ValueError("build_optimizer: the models have no trainable parameters")
    if optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), weight_decay=weight_decay)
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)


def learning_rates(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """What the log records: `lr`, the scheduled base learning rate (group 0's, as always; divided
    by its `lr_scale` when groups carry one), and `lr_head` when the head has its own groups."""
    groups = optimizer.param_groups
    rates = {"lr": groups[0]["lr"] / groups[0]["lr_scale"] if "lr_scale" in groups[0] else groups[0]["lr"]}
    head = next((group for group in groups if "_head_" in group.get("name", "")), None)
    if head is not None:
        rates["lr_head"] = head["lr"]
    return rates


def poly_schedule(optimizer: torch.optim.Optimizer, total_steps: int, power: float = 0.9, warmup_steps: int = 0):
    """Per-iteration poly decay: lr_t = lr * (1 - t / total_steps) ** power, 0 after total_steps.

    This is transformers' polynomial schedule with lr_end = 0, which is the same formula (up to
    float rounding). With `warmup_steps` W > 0 (transformers' convention): lr_t = lr * t / W for
    t < W (the first step runs at 0), then lr * (1 - (t - W) / (total_steps - W)) ** power.
    W = 0 is exactly the schedule without warm-up. Each group's own lr is scaled by the same
    factor. Call `scheduler.step()` once per optimizer step; under Accelerate a prepared
    scheduler steps once per process, so pass total_steps and warmup_steps x num_processes as
    the transformers no_trainer examples do.
    """
    if total_steps <= 0:
        raise ValueError(f"poly_schedule: total_steps must be > 0, got {total_steps}")
    if not 0 <= warmup_steps < total_steps:
        raise ValueError(f"poly_schedule: warmup_steps must be in [0, total_steps {total_steps}), got {warmup_steps}")
    return get_polynomial_decay_schedule_with_warmup(
        optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps, lr_end=0.0, power=power
    )
