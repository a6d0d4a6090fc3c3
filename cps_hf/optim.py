"""Optimizer and learning-rate schedule of CPS.

The original trains each branch with its own SGD (momentum 0.9, same LR for backbone and head,
no weight decay on BN parameters and biases) and a per-iteration poly schedule. Here both
networks share ONE optimizer with per-network parameter groups: the update is the same, and
under fp16 one optimizer means one GradScaler step, so an overflow in one network cannot
corrupt the other's update (two optimizers share the scaler's state).
"""

from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn
from transformers import get_polynomial_decay_schedule_with_warmup
from transformers.trainer_pt_utils import get_parameter_names

# Every torch normalisation layer (BatchNorm*, SyncBatchNorm, InstanceNorm* derive from _NormBase;
# timm's BatchNormAct2d / LayerNorm2d / GroupNorm derive from these).
NORM_LAYER_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


def decay_parameter_names(model: nn.Module) -> set[str]:
    """Names of the parameters that get weight decay: everything but norm-layer params and biases."""
    names = get_parameter_names(model, NORM_LAYER_TYPES)
    return {name for name in names if not name.endswith("bias")}


def build_optimizer(
    models: Iterable[nn.Module],
    lr: float,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    no_decay_on_norm_and_bias: bool = True,
) -> torch.optim.SGD:
    """One SGD over all `models`, two parameter groups per model ("model{i}_decay", "model{i}_no_decay").

    Every trainable parameter is in exactly one group; frozen parameters (requires_grad False)
    are left out. The same `lr` for every group (no 10x head LR, as the original).

    `weight_decay` default 5e-4 is the paper's stated value; the original code's effective value
    is 4e-4 (VOC, 4 GPUs) / 8e-4 (Cityscapes, 8 GPUs) at lr 0.0025, see the facts note.
    """
    groups = []
    seen: set[int] = set()
    for index, model in enumerate(models):
        decay_names = decay_parameter_names(model) if no_decay_on_norm_and_bias else None
        decay, no_decay = [], []
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            if id(param) in seen:
                raise ValueError(
                    f"build_optimizer: parameter {name!r} of model {index} is shared with an earlier model; "
                    "CPS needs two independent networks"
                )
            seen.add(id(param))
            (decay if decay_names is None or name in decay_names else no_decay).append(param)
        groups.append({"name": f"model{index}_decay", "params": decay, "weight_decay": weight_decay})
        groups.append({"name": f"model{index}_no_decay", "params": no_decay, "weight_decay": 0.0})
    groups = [group for group in groups if group["params"]]
    if not groups:
        raise ValueError("build_optimizer: the models have no trainable parameters")
    return torch.optim.SGD(groups, lr=lr, momentum=momentum, weight_decay=weight_decay)


def poly_schedule(optimizer: torch.optim.Optimizer, total_steps: int, power: float = 0.9):
    """Per-iteration poly decay: lr_t = lr * (1 - t / total_steps) ** power, 0 after total_steps.

    This is transformers' polynomial schedule with no warm-up and lr_end = 0, which is the same
    formula (up to float rounding). Call `scheduler.step()` once per optimizer step; under
    Accelerate a prepared scheduler steps once per process, so pass
    total_steps * num_processes as the transformers no_trainer examples do.
    """
    if total_steps <= 0:
        raise ValueError(f"poly_schedule: total_steps must be > 0, got {total_steps}")
    return get_polynomial_decay_schedule_with_warmup(
        optimizer, num_warmup_steps=0, num_training_steps=total_steps, lr_end=0.0, power=power
    )
