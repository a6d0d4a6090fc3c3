"""The tiny random-init CPS networks the tests build: a few labels, narrow heads, and BN statistics that are
not the init's, so a save/load that silently re-initialised them would show."""

from __future__ import annotations

from typing import Sequence

import torch

from cps_hf import CPSConfig, CPSForSemanticSegmentation

LABELS = ("background", "cat", "dog")


def tiny_config(labels: Sequence[str] | int = LABELS, backbone: str = "resnet18", channels: int = 16,
                **overrides) -> CPSConfig:
    """A CPSConfig with narrow ASPP/decoder (`channels`) and 8 low-level channels; `labels` is the class
    names or a count (named class0, class1, ...). Other fields as keywords."""
    names = [f"class{i}" for i in range(labels)] if isinstance(labels, int) else list(labels)
    fields = dict(backbone=backbone, num_labels=len(names), id2label=dict(enumerate(names)),
                  label2id={name: i for i, name in enumerate(names)}, aspp_channels=channels,
                  decoder_channels=channels, low_level_channels=8)
    fields.update(overrides)
    return CPSConfig(**fields)


def with_running_statistics(model: CPSForSemanticSegmentation) -> CPSForSemanticSegmentation:
    """Random BN running statistics (positive variances), the model in eval mode."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.running_mean.normal_()
                module.running_var.uniform_(0.5, 1.5)
    return model.eval()


def logits_of(model, pixel_values: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(pixel_values=pixel_values).logits
