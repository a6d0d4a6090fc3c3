"""One CPS segmentation network: a timm backbone under the DeepLabv3+ head of the original CPS code.

Read top to bottom: building blocks (backbone taps, plain-ViT backbones and their neck, ASPP,
decoder), then the `PreTrainedModel` base that knows how to initialise only the head (neck
included), then the semantic-segmentation model.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import json
import math
import os
import re
from typing import NamedTuple

import timm
import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import SemanticSegmenterOutput

from .configuration_cps import CPSConfig, CPSEnsembleConfig


# ---------------------------------------------------------------------------------------------
# Backbone
# ---------------------------------------------------------------------------------------------


def _default_out_indices(feature_info) -> list[int]:
    """The decoder needs the stride-4 level (low-level detail) and the last level (semantics)."""
    reductions = feature_info.reduction()
    stride4 = [i for i, r in enumerate(reductions) if r == 4]
    if not stride4:
        raise ValueError(
            f"backbone has no stride-4 feature level (reductions {reductions}); "
            "set CPSConfig.backbone_out_indices=[low_level_index, high_level_index]"
        )
    return [stride4[0], len(reductions) - 1]


def _apply_multi_grid(stage: nn.Module, multi_grid, backbone_name: str) -> None:
    """Give block i of the last ResNet stage dilation `stage_dilation * multi_grid[i]` (DeepLabv3).

    timm dilates the last stage uniformly (and leaves its first block undilated); the original
    CPS backbone uses multi-grid 1/2/4 on top of the stage dilation, i.e. 2/4/8 at stride 16.
    """
    blocks = list(stage.children())
    if not blocks or not all(hasattr(block, "conv2") for block in blocks):
        raise ValueError(f"CPSConfig.multi_grid needs a ResNet-family backbone, got {backbone_name!r}")
    stage_dilation = max(block.conv2.dilation[0] for block in blocks)
    for index, block in enumerate(blocks):
        dilation = stage_dilation * multi_grid[index % len(multi_grid)]
        # Bottleneck: conv2 is the 3x3; BasicBlock: conv1 and conv2 both are.
        for conv in (getattr(block, "conv1", None), block.conv2):
            if isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3) and conv.stride == (1, 1):
                conv.dilation = (dilation, dilation)
                conv.padding = (dilation, dilation)


class UnknownBackboneError(ValueError):
    """A backbone name timm does not know; the message suggests close names."""


def _unknown_backbone_message(name: str, error: RuntimeError) -> str | None:
    """One line for the names timm refuses (unknown architecture, unknown pretrained tag), else None."""
    arch, _, tag = name.partition(".")
    if str(error).startswith("Unknown model"):
        close = difflib.get_close_matches(arch, timm.list_models(), n=6, cutoff=0.6)
        close = close or timm.list_models(f"{re.split(r'[0-9_]', arch)[0]}*")[:6]
        hint = f"close names: {', '.join(close)}" if close else "list them with timm.list_models('pattern*')"
        return f"backbone {name!r} is not a timm model; {hint}"
    if str(error).startswith("Invalid pretrained tag"):
        tags = [known.partition(".")[2] for known in timm.list_pretrained(f"{arch}.*")]
        return f"backbone {name!r}: timm has no pretrained tag {tag!r} for {arch}; tags: {', '.join(tags) or 'none'}"
    return None


def _create_timm(name: str, pretrained: bool, kwargs: dict) -> nn.Module:
    try:
        return timm.create_model(name, features_only=True, pretrained=pretrained, **kwargs)
    except (AssertionError, TypeError) as error:
        raise ValueError(
            f"timm could not build backbone {name!r} with {kwargs}: {error!r}. "
            "Backbones that cannot dilate (e.g. HRNet) need CPSConfig.output_stride=None."
        ) from error
    except RuntimeError as error:
        message = _unknown_backbone_message(name, error)
        if message is None:
            raise
        raise UnknownBackboneError(message) from None


def create_backbone(
    config: CPSConfig, pretrained: bool = False, checkpoint_path: str | None = None, state_dict: dict | None = None
) -> nn.Module:
    """A timm `features_only` network with explicit taps (a plain ViT: the whole ViT, see
    `create_plain_vit`); random weights unless asked otherwise.

    `state_dict` (a timm/PyTorch classifier checkpoint already read) goes through timm's own loader,
    so its model-specific key conversions and the features-only wrapping apply.
    """
    vit = plain_vit_facts(config)
    if vit is not None:
        return create_plain_vit(config, vit, pretrained, checkpoint_path, state_dict)
    if config.vit_feature_indices is not None:
        raise ValueError(
            f"CPSConfig.vit_feature_indices is for plain ViT backbones; {config.backbone!r} is not one "
            "(use backbone_out_indices to choose its feature levels)"
        )
    kwargs = dict(config.backbone_kwargs or {})
    if config.output_stride is not None:
        kwargs["output_stride"] = config.output_stride
    if config.backbone_out_indices is not None:
        kwargs["out_indices"] = tuple(config.backbone_out_indices)
    if "out_indices" not in kwargs:
        # Explicit taps: find the stride-4 and last levels on a weightless (meta) copy first.
        with torch.device("meta"):
            probe = _create_timm(config.backbone, False, kwargs)
        indices = _default_out_indices(probe.feature_info)
        kwargs["out_indices"] = tuple(probe.feature_info.out_indices[i] for i in indices)
    if checkpoint_path is not None:
        kwargs["pretrained_cfg_overlay"] = dict(file=os.fspath(checkpoint_path))
    if state_dict is not None:
        kwargs["pretrained_cfg_overlay"] = dict(state_dict=state_dict)
    loads = pretrained or checkpoint_path is not None or state_dict is not None
    backbone = _create_timm(config.backbone, loads, kwargs)
    if config.multi_grid:
        stage_name = backbone.feature_info.module_name()[-1]
        try:
            stage = backbone.get_submodule(stage_name)
        except AttributeError:  # FeatureListNet flattens dotted names
            stage = backbone.get_submodule(stage_name.replace(".", "_"))
        _apply_multi_grid(stage, config.multi_grid, config.backbone)
    return backbone


# ---------------------------------------------------------------------------------------------
# Plain ViT backbones (DINOv2 and other timm ViTs with `forward_intermediates`)
# ---------------------------------------------------------------------------------------------


class PlainViTFacts(NamedTuple):
    """What the model needs to know about a plain ViT before building it."""

    patch_size: tuple[int, int]
    depth: int
    embed_dim: int


@functools.lru_cache(maxsize=64)
def _probe_plain_vit(name: str, kwargs_json: str) -> PlainViTFacts | None:
    try:
        with torch.device("meta"):  # no weights, no download: a look at the architecture only
            model = timm.create_model(name, pretrained=False, **json.loads(kwargs_json))
    except Exception:  # unknown names and kwargs: the features_only path reports them properly
        return None
    levels = getattr(model, "feature_info", None)
    reductions = [level.get("reduction") for level in levels] if isinstance(levels, list) else []
    blocks = getattr(model, "blocks", None)
    patch_embed = getattr(model, "patch_embed", None)
    plain = (hasattr(model, "forward_intermediates") and hasattr(model, "prune_intermediate_layers")
             and patch_embed is not None and isinstance(blocks, (nn.Sequential, nn.ModuleList))
             and 4 not in reductions)
    if not plain:
        return None
    patch = getattr(patch_embed, "patch_size", None) or (reductions[-1], reductions[-1])
    patch = tuple(patch) if isinstance(patch, (tuple, list)) else (patch, patch)
    return PlainViTFacts(patch, len(blocks), int(getattr(model, "embed_dim", None) or model.num_features))


def plain_vit_facts(config: CPSConfig) -> PlainViTFacts | None:
    """Patch size, depth and width when `config.backbone` is a plain ViT, else None (a CNN).

    A plain ViT is a timm model with `patch_embed` and `forward_intermediates` whose levels are all
    at the patch stride: `features_only` would give DeepLabv3+ no stride-4 level (Swin, which has
    one, stays on the CNN path). Decided on a weightless (meta) copy, cached per name and kwargs.
    """
    kwargs = json.dumps(dict(config.backbone_kwargs or {}), sort_keys=True, default=str)
    return _probe_plain_vit(config.backbone, kwargs)


def vit_tap_indices(config: CPSConfig, depth: int) -> list[int]:
    """The tapped blocks, 0-based and ascending: `config.vit_feature_indices`, or four evenly spaced
    blocks ending at the last (DINOv2's segmentation recipes: [2, 5, 8, 11] of 12)."""
    if config.vit_feature_indices is None:
        return sorted({max(depth * (k + 1) // 4 - 1, 0) for k in range(4)})
    bad = [index for index in config.vit_feature_indices if not -depth <= index < depth]
    if bad:
        raise ValueError(
            f"CPSConfig.vit_feature_indices {list(config.vit_feature_indices)}: {bad} out of range for "
            f"{config.backbone!r}, which has {depth} blocks (0..{depth - 1}, or negative from the end)"
        )
    indices = sorted(index % depth for index in config.vit_feature_indices)
    if len(set(indices)) != len(indices):
        raise ValueError(f"CPSConfig.vit_feature_indices {list(config.vit_feature_indices)} names a block twice")
    return indices


def _check_vit_config(config: CPSConfig) -> None:
    """CNN-only fields on a ViT fail here, naming the field, instead of deep inside timm."""
    where = f"backbone {config.backbone!r} is a plain ViT"
    if config.output_stride not in (None, 16):
        raise ValueError(
            f"CPSConfig.output_stride={config.output_stride}: {where}, which runs at its patch stride; "
            "leave output_stride at 16 (ignored) or None"
        )
    if config.backbone_out_indices is not None:
        raise ValueError(f"CPSConfig.backbone_out_indices: {where}; choose its taps with vit_feature_indices")
    if config.multi_grid:
        raise ValueError(f"CPSConfig.multi_grid needs a ResNet-family backbone, got {config.backbone!r}")


def create_plain_vit(
    config: CPSConfig,
    vit: PlainViTFacts,
    pretrained: bool = False,
    checkpoint_path: str | None = None,
    state_dict: dict | None = None,
) -> nn.Module:
    """The whole timm ViT (no `features_only`: it would drop the final norm the taps use), without
    its classifier, accepting any side that is a multiple of the patch (position embeddings are
    resampled), with the blocks after the last tap removed so every parameter reaches the logits.

    Weights load through timm's loader as on the CNN path (its checkpoint filters convert original
    DINOv2 keys and resample position embeddings); a local file or state dict loads non-strictly, so
    `cps_hf.weights` can report what fitted, while timm's Hub weights load strictly.
    """
    _check_vit_config(config)
    kwargs = {"num_classes": 0, "dynamic_img_size": True, **(config.backbone_kwargs or {})}
    if checkpoint_path is not None:
        kwargs["pretrained_cfg_overlay"] = dict(file=os.fspath(checkpoint_path))
    if state_dict is not None:
        kwargs["pretrained_cfg_overlay"] = dict(state_dict=state_dict)
    if "pretrained_cfg_overlay" in kwargs:
        kwargs["pretrained_strict"] = False
    loads = pretrained or checkpoint_path is not None or state_dict is not None
    try:
        backbone = timm.create_model(config.backbone, pretrained=loads, **kwargs)
    except (AssertionError, TypeError) as error:
        hint = (" (plain ViTs are built with dynamic_img_size=True so that any input size works; this one "
                "does not support it)" if "dynamic_img_size" in str(error) else "")
        raise ValueError(
            f"timm could not build ViT backbone {config.backbone!r} with {kwargs}: {error!r}{hint}"
        ) from error
    backbone.prune_intermediate_layers(vit_tap_indices(config, vit.depth), prune_norm=False, prune_head=True)
    return backbone


def pad_to_patch_multiple(pixel_values: torch.Tensor, patch_size: tuple[int, int], config: CPSConfig) -> torch.Tensor:
    """Zero-pad right and bottom to a multiple of the patch (zero is the mean colour after
    normalisation), or refuse when `config.pad_to_patch_multiple` is off."""
    height, width = pixel_values.shape[-2:]
    pad_h, pad_w = -height % patch_size[0], -width % patch_size[1]
    if not (pad_h or pad_w):
        return pixel_values
    if not config.pad_to_patch_multiple:
        raise ValueError(
            f"input size {height}x{width} is not a multiple of the patch size {patch_size[0]}x{patch_size[1]} "
            f"of ViT backbone {config.backbone!r}: resize or crop it to a multiple, or set "
            "CPSConfig.pad_to_patch_multiple=True to pad inside the model"
        )
    return F.pad(pixel_values, (0, pad_w, 0, pad_h))


class CPSViTNeck(nn.Module):
    """Tapped ViT token maps (all at the patch stride) -> DeepLabv3+'s two inputs.

    Low level: the earliest tap, upsampled 4x by two stride-2 transposed convs (a simple feature
    pyramid's finest level; stride 3.5 for patch 14, which is fine: the decoder resizes the context
    to it and the logits are resized to the input). Context: every tap concatenated and fused by a
    1x1 conv, at the patch stride, for the ASPP. New weights, so part of the head: each CPS network
    initialises its own.
    """

    def __init__(self, config: CPSConfig, embed_dim: int, num_taps: int):
        super().__init__()
        bn = dict(eps=config.norm_eps, momentum=config.norm_momentum)
        half, quarter = max(embed_dim // 2, 1), max(embed_dim // 4, 1)
        self.low_level_channels, self.context_channels = quarter, embed_dim
        self.upsample = nn.Sequential(
            nn.ConvTranspose2d(embed_dim, half, 2, stride=2, bias=False),
            nn.BatchNorm2d(half, **bn),
            nn.ReLU(inplace=True),
            nn.ConvTranspose2d(half, quarter, 2, stride=2, bias=False),
            nn.BatchNorm2d(quarter, **bn),
            nn.ReLU(inplace=True),
        )
        self.fuse = nn.Sequential(
            nn.Conv2d(embed_dim * num_taps, embed_dim, 1, bias=False),
            nn.BatchNorm2d(embed_dim, **bn),
            nn.ReLU(inplace=True),
        )
        for layer in self.modules():  # transformers initialises leaf by leaf: tag the neck's leaves
            layer._cps_head_layer = True

    def forward(self, taps: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.upsample(taps[0]), self.fuse(torch.cat(list(taps), dim=1))


# ---------------------------------------------------------------------------------------------
# Head blocks
# ---------------------------------------------------------------------------------------------


class CPSASPP(nn.Module):
    """The original CPS ASPP: four conv branches -> concat -> BN+LeakyReLU -> 1x1, plus an image-pooling
    branch *added* (not concatenated) before the final BN+LeakyReLU."""

    def __init__(self, config: CPSConfig, in_channels: int):
        super().__init__()
        hidden = config.aspp_channels
        self.branches = nn.ModuleList([nn.Conv2d(in_channels, hidden, 1, bias=False)])
        for rate in config.aspp_rates:
            self.branches.append(nn.Conv2d(in_channels, hidden, 3, padding=rate, dilation=rate, bias=False))
        self.branches_norm = nn.BatchNorm2d(4 * hidden, eps=config.norm_eps, momentum=config.norm_momentum)
        self.reduce = nn.Conv2d(4 * hidden, hidden, 1, bias=False)
        self.pool_conv = nn.Conv2d(in_channels, hidden, 1, bias=False)
        self.pool_norm = nn.BatchNorm2d(hidden, eps=config.norm_eps, momentum=config.norm_momentum)
        self.pool_reduce = nn.Conv2d(hidden, hidden, 1, bias=False)
        self.out_norm = nn.BatchNorm2d(hidden, eps=config.norm_eps, momentum=config.norm_momentum)
        self.act = nn.LeakyReLU(0.01)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        self._check_pool_batch(features)
        out = torch.cat([branch(features) for branch in self.branches], dim=1)
        out = self.reduce(self.act(self.branches_norm(out)))
        pooled = F.adaptive_avg_pool2d(features, 1)
        pooled = self.pool_reduce(self.act(self.pool_norm(self.pool_conv(pooled))))
        return self.act(self.out_norm(out + pooled))

    def _check_pool_batch(self, features: torch.Tensor) -> None:
        """The pooling branch's BatchNorm sees one value per channel and image; with one image torch
        fails with a cryptic message. SyncBatchNorm (not a BatchNorm2d) pools images over processes."""
        if self.training and features.shape[0] == 1 and isinstance(self.pool_norm, nn.BatchNorm2d):
            raise ValueError(
                "the ASPP image-pooling BatchNorm needs at least 2 images per device in each forward pass in "
                "training (it normalises one 1x1 map per image), got 1: use per_device_train_batch_size >= 2, "
                "or SyncBatchNorm on multi-GPU runs, or put the model in eval mode"
            )


class CPSDecoder(nn.Module):
    """DeepLabv3+ decoder: 48-channel stride-4 projection, concat with upsampled ASPP, two 3x3 convs."""

    def __init__(self, config: CPSConfig, low_level_in: int):
        super().__init__()
        bn = dict(eps=config.norm_eps, momentum=config.norm_momentum)
        self.align_corners = config.align_corners
        self.low_level = nn.Sequential(
            nn.Conv2d(low_level_in, config.low_level_channels, 1, bias=False),
            nn.BatchNorm2d(config.low_level_channels, **bn),
            nn.ReLU(inplace=True),
        )
        fused = config.aspp_channels + config.low_level_channels
        self.fuse = nn.Sequential(
            nn.Conv2d(fused, config.decoder_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(config.decoder_channels, **bn),
            nn.ReLU(inplace=True),
            nn.Conv2d(config.decoder_channels, config.decoder_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(config.decoder_channels, **bn),
            nn.ReLU(inplace=True),
        )

    def forward(self, low_level: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        low_level = self.low_level(low_level)
        context = F.interpolate(context, size=low_level.shape[-2:], mode="bilinear", align_corners=self.align_corners)
        return self.fuse(torch.cat([context, low_level], dim=1))


class CPSDeepLabV3PlusHead(nn.Module):
    """ASPP + decoder + classifier; everything CPS initialises differently in its two networks."""

    def __init__(self, config: CPSConfig, low_level_in: int, high_level_in: int):
        super().__init__()
        self.aspp = CPSASPP(config, high_level_in)
        self.decoder = CPSDecoder(config, low_level_in)
        self.dropout = nn.Dropout2d(config.classifier_dropout) if config.classifier_dropout > 0 else nn.Identity()
        self.classifier = nn.Conv2d(config.decoder_channels, config.num_labels, 1, bias=True)
        for layer in self.modules():  # transformers initialises leaf by leaf: tag the head's leaves
            layer._cps_head_layer = True

    def forward(self, low_level: torch.Tensor, high_level: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.dropout(self.decoder(low_level, self.aspp(high_level))))


class CPSDPTResidualUnit(nn.Module):
    """ReLU, 3x3 conv, ReLU, 3x3 conv, plus the input: DPT's residual conv unit (no BatchNorm, as UniMatch V2)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features + self.conv2(F.relu(self.conv1(F.relu(features))))


class CPSDPTFusion(nn.Module):
    """One step of DPT's coarse-to-fine path: add the refined lateral map (all but the coarsest step), refine,
    upsample bilinearly (to the next level's size, or 2x at the finest), project by a 1x1 conv."""

    def __init__(self, channels: int, has_lateral: bool, align_corners: bool):
        super().__init__()
        self.lateral = CPSDPTResidualUnit(channels) if has_lateral else None
        self.refine = CPSDPTResidualUnit(channels)
        self.project = nn.Conv2d(channels, channels, 1)
        self.align_corners = align_corners

    def forward(self, path: torch.Tensor, lateral: torch.Tensor | None = None, size=None) -> torch.Tensor:
        if lateral is not None:
            path = path + self.lateral(lateral)
        path = self.refine(path)
        resize = dict(size=tuple(size)) if size is not None else dict(scale_factor=2)
        path = F.interpolate(path, **resize, mode="bilinear", align_corners=self.align_corners)
        return self.project(path)


def dpt_default_features(embed_dim: int) -> int:
    """UniMatch V2's fusion width for DINOv2-S/B/L/g, a sixth of the encoder width otherwise."""
    return {384: 64, 768: 128, 1024: 256, 1536: 384}.get(embed_dim, max(embed_dim // 6, 1))


class CPSDPTHead(nn.Module):
    """DPT's decoder on four tapped ViT blocks (patch-grid maps), as UniMatch V2 runs it on DINOv2.

    Each tap is projected (1x1) and resampled to 4x, 2x, 1x and 1/2x the patch grid (the reassemble
    step), mapped to `dpt_features` channels by a 3x3 conv, fused from the coarsest level up, and
    classified at 8x the patch grid; the model resizes the logits to the input. The coarsest fusion has
    no lateral unit (UniMatch V2 builds one that it never calls), so every parameter gets a gradient.
    """

    def __init__(self, config: CPSConfig, embed_dim: int):
        super().__init__()
        channels = list(config.dpt_channels or (embed_dim // 8, embed_dim // 4, embed_dim // 2, embed_dim))
        features = config.dpt_features or dpt_default_features(embed_dim)
        self.projections = nn.ModuleList([nn.Conv2d(embed_dim, c, 1) for c in channels])
        self.resamplers = nn.ModuleList([
            nn.ConvTranspose2d(channels[0], channels[0], 4, stride=4),
            nn.ConvTranspose2d(channels[1], channels[1], 2, stride=2),
            nn.Identity(),
            nn.Conv2d(channels[3], channels[3], 3, stride=2, padding=1),
        ])
        self.levels = nn.ModuleList([nn.Conv2d(c, features, 3, padding=1, bias=False) for c in channels])
        self.fusions = nn.ModuleList([CPSDPTFusion(features, has_lateral=k < 3, align_corners=True)
                                      for k in range(4)])
        self.output_conv = nn.Conv2d(features, features, 3, padding=1)
        self.classifier = nn.Conv2d(features, config.num_labels, 1)

    def forward(self, *taps: torch.Tensor) -> torch.Tensor:
        if len(taps) != 4:
            raise ValueError(f"the DPT head needs four tapped blocks, got {len(taps)}")
        levels = [level(resample(project(tap))) for tap, project, resample, level
                  in zip(taps, self.projections, self.resamplers, self.levels)]
        path = self.fusions[3](levels[3], size=levels[2].shape[-2:])
        path = self.fusions[2](path, levels[2], size=levels[1].shape[-2:])
        path = self.fusions[1](path, levels[1], size=levels[0].shape[-2:])
        path = self.fusions[0](path, levels[0])
        return self.classifier(F.relu(self.output_conv(path)))


# ---------------------------------------------------------------------------------------------
# Pretrained model base
# ---------------------------------------------------------------------------------------------


def _with_perturbed_copy(features, rate: float | None, seed: int | None = None):
    """The head's inputs as they are, or (rate given) each followed by a channel-dropped copy along the batch:
    `Dropout2d(rate)`, its channel masks drawn from `seed` when given (a resumed run draws the same ones)."""
    if not rate:
        return tuple(features)
    if seed is None:
        return tuple(torch.cat([f, F.dropout2d(f, rate, training=True)]) for f in features)
    perturbed = []
    for index, f in enumerate(features):
        generator = torch.Generator(device=f.device).manual_seed(int(seed) + index)
        keep = torch.rand(f.shape[0], f.shape[1], 1, 1, generator=generator, device=f.device) >= rate
        perturbed.append(torch.cat([f, f * keep.to(f.dtype) / (1.0 - rate)]))
    return tuple(perturbed)


def _complementary_dropout(features, rate: float, seed: int | None = None, shared: bool = False):
    """UniMatch V2's complementary channel dropout on a batch that holds two views of the same images
    (first half, second half): each channel of a view-1 image is zeroed or doubled at random, the same
    channel of its view-2 twin gets the opposite, and `1 - rate` of the pairs are left unchanged.
    `shared`: one mask for every feature map (V2's four ViT taps, all of one width); otherwise one per map."""
    batch = features[0].shape[0]
    if batch % 2:
        raise ValueError(f"complementary dropout needs two views per image (an even batch), got a batch of {batch}")
    device = features[0].device
    generator = None if seed is None else torch.Generator(device=device).manual_seed(int(seed))
    half = batch // 2
    untouched = torch.randperm(half, generator=generator, device=device)[:int(half * (1 - rate))]

    def masks(channels: int) -> torch.Tensor:
        first = torch.randint(0, 2, (half, channels), generator=generator, device=device).float() * 2.0
        first[untouched] = 1.0
        return torch.cat([first, 2.0 - first])[:, :, None, None]

    if shared:
        mask = masks(features[0].shape[1])
        return tuple(f * mask.to(f.dtype) for f in features)
    return tuple(f * masks(f.shape[1]).to(f.dtype) for f in features)


class CPSPreTrainedModel(PreTrainedModel):
    config: CPSConfig
    config_class = CPSConfig
    base_model_prefix = "cps"
    main_input_name = "pixel_values"
    input_modalities = ("image",)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Initialise the head (and a ViT's neck) only, as the original: kaiming-normal (fan_in, relu)
        convs, BN 1/0.

        The backbone is left alone: timm has initialised it (or pretrained weights are loaded into
        it later), and transformers' generic init would wipe its weights and BN statistics.
        The classifier bias keeps PyTorch's default init, like the original.
        """
        if not getattr(module, "_cps_head_layer", False):
            return
        if isinstance(module, nn.Conv2d):
            init.kaiming_normal_(module.weight, mode="fan_in", nonlinearity="relu")
            if module.bias is not None:
                bound = 1.0 / (module.weight[0].numel() ** 0.5)
                init.uniform_(module.bias, -bound, bound)
        elif isinstance(module, nn.ConvTranspose2d):
            # Kaiming (relu) over the inputs that really reach one output pixel: in_channels x
            # ceil(kernel / stride) per side. torch's fan_in reads the wrong weight axis here.
            reach = math.prod(math.ceil(k / s) for k, s in zip(module.kernel_size, module.stride))
            init.normal_(module.weight, mean=0.0, std=(2.0 / (module.in_channels * reach)) ** 0.5)
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, nn.BatchNorm2d):
            init.ones_(module.weight)
            init.zeros_(module.bias)
            init.zeros_(module.running_mean)
            init.ones_(module.running_var)
            init.zeros_(module.num_batches_tracked)


# ---------------------------------------------------------------------------------------------
# Semantic segmentation model
# ---------------------------------------------------------------------------------------------


def _in_backward() -> bool:
    """True while autograd's engine runs, e.g. when gradient checkpointing recomputes a forward."""
    graph_task_id = getattr(torch._C, "_current_graph_task_id", None)  # private, stable since torch 1.x
    return graph_task_id is not None and graph_task_id() != -1


def _swap_in_scratch_statistics(module: nn.Module, args) -> None:
    """Forward pre-hook: a checkpointed BatchNorm recomputed in backward would update its running
    statistics a second time with the same batch; let it update scratch copies instead."""
    if module.training and module.track_running_stats and _in_backward():
        names = ("running_mean", "running_var", "num_batches_tracked")
        module._cps_kept_statistics = {name: module._buffers[name] for name in names}
        for name in names:
            module._buffers[name] = module._buffers[name].clone()


def _restore_statistics(module: nn.Module, args, output) -> None:
    """Forward hook: put the real running statistics back (no in-place write, nothing saved is touched)."""
    kept = module.__dict__.pop("_cps_kept_statistics", None)
    if kept:
        module._buffers.update(kept)


class CPSForSemanticSegmentation(CPSPreTrainedModel):
    """DeepLabv3+ (or, on a plain ViT, DPT) on a timm backbone; `logits` come back at the input resolution.

    CNN backbones feed their stride-4 and last levels to the head. A plain ViT (DINOv2, ...) feeds
    its tapped blocks to `neck` (None for CNNs and for the DPT head, so their state dict has no `neck.`
    keys), which makes DeepLabv3+'s two inputs, or straight to the DPT head (`config.decode_head="dpt"`);
    the input is padded to a multiple of the patch and the logits cropped.
    """

    def __init__(self, config: CPSConfig):
        super().__init__(config)
        vit = plain_vit_facts(config)
        self.backbone = create_backbone(config)
        self.neck, self.vit_taps, self.patch_size = None, None, None
        if vit is None:
            if config.decode_head == "dpt":
                raise ValueError(f"CPSConfig.decode_head='dpt' needs a plain ViT backbone (e.g. "
                                 f"vit_small_patch14_dinov2), got the CNN {config.backbone!r}")
            self.decode_head = CPSDeepLabV3PlusHead(config, *self.backbone.feature_info.channels()[-2:])
        else:
            self.vit_taps, self.patch_size = vit_tap_indices(config, vit.depth), vit.patch_size
            if config.decode_head == "dpt":
                if len(self.vit_taps) != 4:
                    raise ValueError(f"CPSConfig.decode_head='dpt' taps four blocks; vit_feature_indices names "
                                     f"{len(self.vit_taps)}: {list(config.vit_feature_indices)}")
                self.decode_head = CPSDPTHead(config, vit.embed_dim)
            else:
                self.neck = CPSViTNeck(config, vit.embed_dim, len(self.vit_taps))
                self.decode_head = CPSDeepLabV3PlusHead(config, self.neck.low_level_channels,
                                                        self.neck.context_channels)
        self._backbone_frozen, self._backbone_checkpointing, self._recompute_hooks = False, False, []
        self.post_init()

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        feature_perturbation: float | None = None,
        perturbation_seed: int | None = None,
        complementary_dropout: float | None = None,
        **kwargs,
    ) -> SemanticSegmenterOutput | tuple:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size, height, width)`, *optional*):
            Ground-truth class indices; `config.semantic_loss_ignore_index` marks pixels to ignore.
        feature_perturbation (`float`, *optional*):
            UniMatch's feature perturbation: the head also runs on the encoder features with channel dropout
            (`Dropout2d` of this rate) and the logits hold the B clean images, then the B perturbed ones
            (2B in all). The head sees both halves in one pass, as UniMatch's model does.
        complementary_dropout (`float`, *optional*):
            UniMatch V2's complementary channel dropout on the head's inputs (a ViT's tapped blocks, one mask
            for all; a CNN's two levels, one mask each). The batch must be two views of the same images, first
            halves then second: a channel zeroed (x0) in one view is doubled (x2) in the other, and a share
            `1 - complementary_dropout` of the pairs is left alone (UniMatch V2: 0.5).
        perturbation_seed (`int`, *optional*):
            Seeds the masks of either perturbation (default: torch's global generator).
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        if feature_perturbation and complementary_dropout:
            raise ValueError("feature_perturbation and complementary_dropout are two methods' perturbations: "
                             "pass one of them")
        if self.vit_taps is None:
            with self._checkpointing_context():
                low_level, high_level = self.backbone(pixel_values)
            hidden_states = (low_level, high_level)
            logits = self.decode_head(*self._perturbed(hidden_states, feature_perturbation, complementary_dropout,
                                                       perturbation_seed, shared=False))
        else:
            logits, hidden_states = self._vit_logits(pixel_values, feature_perturbation, complementary_dropout,
                                                     perturbation_seed)
        if logits.shape[-2:] != pixel_values.shape[-2:]:  # a padded ViT input comes back at its size already
            logits = F.interpolate(
                logits, size=pixel_values.shape[-2:], mode="bilinear", align_corners=self.config.align_corners
            )

        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits, labels.long(), ignore_index=self.config.semantic_loss_ignore_index)

        hidden_states = hidden_states if output_hidden_states else None
        if not return_dict:
            output = (logits,) + ((hidden_states,) if hidden_states is not None else ())
            return ((loss,) + output) if loss is not None else output
        return SemanticSegmenterOutput(loss=loss, logits=logits, hidden_states=hidden_states)

    @staticmethod
    def _perturbed(features, feature_perturbation, complementary_dropout, seed, shared: bool):
        """The head's inputs, with UniMatch's perturbed copy appended or V2's complementary masks applied."""
        if complementary_dropout:
            return _complementary_dropout(tuple(features), complementary_dropout, seed, shared=shared)
        return _with_perturbed_copy(features, feature_perturbation, seed)

    def _vit_logits(self, pixel_values: torch.Tensor, feature_perturbation: float | None = None,
                    complementary_dropout: float | None = None,
                    perturbation_seed: int | None = None) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """Logits of a plain-ViT model at the input size (padding cropped off) and the tapped maps.

        V2's complementary dropout acts on the taps (as UniMatch V2 on DINOv2's intermediate layers), V1's
        feature perturbation on the head's inputs. The logits are resized to the padded size before
        cropping, so each logit stays on its pixel.
        """
        height, width = pixel_values.shape[-2:]
        padded = pad_to_patch_multiple(pixel_values, self.patch_size, self.config)
        with self._checkpointing_context():
            taps = self.backbone.forward_intermediates(
                padded, indices=self.vit_taps, norm=True, intermediates_only=True, output_fmt="NCHW"
            )
        head_taps = self._perturbed(taps, None, complementary_dropout, perturbation_seed, shared=True)
        head_inputs = self.neck(list(head_taps)) if self.neck is not None else head_taps
        logits = self.decode_head(*self._perturbed(head_inputs, feature_perturbation, None, perturbation_seed,
                                                   shared=False))
        if padded.shape[-2:] != pixel_values.shape[-2:]:
            logits = F.interpolate(logits, size=padded.shape[-2:], mode="bilinear",
                                   align_corners=self.config.align_corners)[..., :height, :width]
        return logits, tuple(taps)

    # -- training helpers: memory, frozen backbones, parameter counts -----------------------------

    def _checkpointing_context(self):
        """With backbone checkpointing on, recompute whole stages: torch's early stop would end a
        recomputation inside a module, before the hook that gives a BatchNorm its statistics back."""
        if not self._backbone_checkpointing:
            return contextlib.nullcontext()
        self._hook_backbone_norms()
        return torch.utils.checkpoint.set_checkpoint_early_stop(False)

    def _hook_backbone_norms(self) -> None:
        """Give every backbone BatchNorm the recompute hooks, including norms swapped in after
        checkpointing was enabled (SyncBatchNorm conversion builds new modules)."""
        for module in self.backbone.modules():
            hooked = "_cps_recompute_hooked" in module.__dict__
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and not hooked:
                module._cps_recompute_hooked = True
                self._recompute_hooks += [module.register_forward_pre_hook(_swap_in_scratch_statistics),
                                          module.register_forward_hook(_restore_statistics)]

    def set_backbone_gradient_checkpointing(self, enable: bool = True) -> None:
        """Recompute backbone activations in backward instead of storing them (timm's
        `set_grad_checkpointing`: block by block for ViTs, stage by stage for features_only CNNs).

        Gradients are unchanged. The backbone's BatchNorms update their running statistics once per
        forward, not again when a checkpointed stage is recomputed (torch would do both); hooks that
        see to it are attached at each forward, so converting to SyncBatchNorm afterwards is fine.
        """
        try:
            self.backbone.set_grad_checkpointing(enable)
        except (AttributeError, AssertionError) as error:  # timm's HRNet asserts; others lack the method
            raise ValueError(
                f"backbone {self.config.backbone!r} does not support gradient checkpointing in timm ({error})"
            ) from None
        self._backbone_checkpointing = enable
        for handle in self._recompute_hooks:
            handle.remove()
        self._recompute_hooks = []
        for module in self.backbone.modules():
            module.__dict__.pop("_cps_recompute_hooked", None)

    def freeze_backbone(self, frozen: bool = True) -> "CPSForSemanticSegmentation":
        """Train the neck and head only: backbone parameters stop requiring gradients and the backbone
        stays in eval mode through `train()`, so its BatchNorm statistics do not move either.
        `frozen=False` undoes it (the backbone then follows `train()` again)."""
        self._backbone_frozen = frozen
        self.backbone.requires_grad_(not frozen)
        return self.train(self.training)

    def freeze_backbone_batchnorm(self, frozen: bool = True) -> "CPSForSemanticSegmentation":
        """Keep the backbone's BatchNorm layers in eval mode through `train()`: they normalise with their
        running statistics, which stop moving, while their affine parameters keep training (CutMix-Seg's
        `--freeze_bn` on DeepLabv3+). The head's BatchNorms train as usual. `frozen=False` undoes it."""
        self._backbone_batchnorm_frozen = frozen
        return self.train(self.training)

    def train(self, mode: bool = True) -> "CPSForSemanticSegmentation":
        super().train(mode)
        if getattr(self, "_backbone_frozen", False):
            self.backbone.eval()
        elif getattr(self, "_backbone_batchnorm_frozen", False):
            for module in self.backbone.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):  # SyncBatchNorm and timm's BN+act too
                    module.eval()
        return self

    def parameter_counts(self) -> dict[str, int]:
        """Parameter counts for logs: backbone, head (neck + decode head), trainable, total."""
        def count(parameters) -> int:
            return sum(parameter.numel() for parameter in parameters)

        head = list(self.decode_head.parameters()) + (list(self.neck.parameters()) if self.neck is not None else [])
        return {"backbone": count(self.backbone.parameters()), "head": count(head),
                "trainable": count(p for p in self.parameters() if p.requires_grad), "total": count(self.parameters())}


# ---------------------------------------------------------------------------------------------
# Ensemble of a run's networks (an addition beside the single network above, which it reuses as is)
# ---------------------------------------------------------------------------------------------


def _bare_network(network: nn.Module) -> nn.Module:
    """The network itself, out of DDP (`module`) and torch.compile (`_orig_mod`) wrappers."""
    while True:
        inner = getattr(network, "module", None) or getattr(network, "_orig_mod", None)
        if not isinstance(inner, nn.Module):
            return network
        network = inner


class CPSEnsembleForSemanticSegmentation(CPSPreTrainedModel):
    """All networks of a CPS run in one model; `logits` are the log of the mean of their softmax
    probabilities, so an argmax (the pipeline's, `post_process_semantic_segmentation`'s) is the
    ensemble's prediction and `logits.softmax(1)` is the mean probability.

    `networks[k]` is a plain `CPSForSemanticSegmentation` (its config a `CPSConfig`), so the state dict
    holds `networks.<k>.backbone.*` and `networks.<k>.decode_head.*`. Its config is a
    `CPSEnsembleConfig` (model type `cps_deeplabv3plus_ensemble`), registered with the Auto classes
    on its own, so single-network exports keep loading as `CPSForSemanticSegmentation`.
    """

    config: CPSEnsembleConfig
    config_class = CPSEnsembleConfig

    def __init__(self, config: CPSEnsembleConfig):
        super().__init__(config)
        network_config = config.network_config()
        self.networks = nn.ModuleList(
            [CPSForSemanticSegmentation(network_config) for _ in range(config.ensemble_size)]
        )
        self.post_init()

    @classmethod
    def from_networks(cls, networks, network_names=None) -> "CPSEnsembleForSemanticSegmentation":
        """A new ensemble holding copies of the weights of trained `CPSForSemanticSegmentation` networks
        (DDP/compile wrappers are unwrapped). Network 1's config describes them all; networks whose
        tensors differ from its (another backbone, head size or class count) are refused. The copy is
        built on the CPU (move it with `.to(device)`); the networks are left untouched."""
        networks = [_bare_network(network) for network in networks]
        if not networks:
            raise ValueError("an ensemble needs at least one network")
        config = CPSEnsembleConfig.from_network_config(networks[0].config, len(networks), network_names)
        ensemble = cls(config)
        for index, (member, network) in enumerate(zip(ensemble.networks, networks)):
            try:
                member.load_state_dict(network.state_dict(), strict=True)
            except RuntimeError as error:
                raise ValueError(
                    f"network {index + 1} of {len(networks)} does not have network 1's architecture: "
                    f"{str(error).splitlines()[0]}"
                ) from None
        return ensemble.train(networks[0].training)

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> SemanticSegmenterOutput | tuple:
        r"""
        labels (`torch.LongTensor` of shape `(batch_size, height, width)`, *optional*):
            Ground-truth class indices; the loss is the negative log-likelihood of the mean probability.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        logits, hidden_states = None, ()
        for network in self.networks:
            output = network(pixel_values=pixel_values, output_hidden_states=output_hidden_states, return_dict=True)
            log_probs = F.log_softmax(output.logits.float(), dim=1)
            logits = log_probs if logits is None else torch.logaddexp(logits, log_probs)
            hidden_states += tuple(output.hidden_states or ())
        logits = logits - math.log(len(self.networks))  # log(mean softmax), computed stably

        loss = None
        if labels is not None:
            loss = F.nll_loss(logits, labels.long(), ignore_index=self.config.semantic_loss_ignore_index)

        hidden_states = hidden_states if output_hidden_states else None
        if not return_dict:
            output = (logits,) + ((hidden_states,) if hidden_states is not None else ())
            return ((loss,) + output) if loss is not None else output
        return SemanticSegmenterOutput(loss=loss, logits=logits, hidden_states=hidden_states)


__all__ = ["CPSPreTrainedModel", "CPSForSemanticSegmentation", "CPSEnsembleForSemanticSegmentation", "create_backbone",
           "plain_vit_facts"]
