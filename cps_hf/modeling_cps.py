"""One CPS segmentation network: a timm backbone under the DeepLabv3+ head of the original CPS code.

Read top to bottom: building blocks (backbone taps, ASPP, decoder), then the `PreTrainedModel`
base that knows how to initialise only the head, then the semantic-segmentation model.
"""

from __future__ import annotations

import difflib
import importlib
import math
import os
import re

import timm
import torch
import torch.nn.functional as F
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
    """A timm `features_only` network with explicit taps; random weights unless asked otherwise.

    `state_dict` (a timm/PyTorch classifier checkpoint already read) goes through timm's own loader,
    so its model-specific key conversions and the features-only wrapping apply.
    """
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
        out = torch.cat([branch(features) for branch in self.branches], dim=1)
        out = self.reduce(self.act(self.branches_norm(out)))
        pooled = F.adaptive_avg_pool2d(features, 1)
        pooled = self.pool_reduce(self.act(self.pool_norm(self.pool_conv(pooled))))
        return self.act(self.out_norm(out + pooled))


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


# ---------------------------------------------------------------------------------------------
# Pretrained model base
# ---------------------------------------------------------------------------------------------


class CPSPreTrainedModel(PreTrainedModel):
    config: CPSConfig
    config_class = CPSConfig
    base_model_prefix = "cps"
    main_input_name = "pixel_values"
    input_modalities = ("image",)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Initialise the head only, as the original: kaiming-normal (fan_in, relu) convs, BN 1/0.

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
        elif isinstance(module, nn.BatchNorm2d):
            init.ones_(module.weight)
            init.zeros_(module.bias)
            init.zeros_(module.running_mean)
            init.ones_(module.running_var)
            init.zeros_(module.num_batches_tracked)


# ---------------------------------------------------------------------------------------------
# Semantic segmentation model
# ---------------------------------------------------------------------------------------------


class CPSForSemanticSegmentation(CPSPreTrainedModel):
    """DeepLabv3+ on a timm backbone; `logits` come back at the input resolution."""

    def __init__(self, config: CPSConfig):
        super().__init__(config)
        self.backbone = create_backbone(config)
        low_in, high_in = self.backbone.feature_info.channels()[-2:]
        self.decode_head = CPSDeepLabV3PlusHead(config, low_in, high_in)
        self.post_init()

    def load_pretrained_backbone(self, source: str | os.PathLike | bool = True) -> "CPSForSemanticSegmentation":
        """Load ImageNet weights into the backbone after construction (so `post_init` cannot touch them).

        `source=True` takes timm's default pretrained tag from the Hub (what users do); a path loads
        a local timm/PyTorch checkpoint (.safetensors, .pth, .bin) or the backbone of a cps_hf model
        file. Weights that match no backbone tensor, or cannot be fetched, raise one line (see
        `cps_hf.weights`). `from_pretrained` never calls this: a trained model's backbone comes from
        its own safetensors.
        """
        # Imported by name: this file ships as remote code (hub.REMOTE_CODE_FILES), where a relative
        # import would need cps_hf's other modules next to it. Training always has cps_hf installed.
        importlib.import_module("cps_hf.weights").load_backbone_weights(self, source)
        return self

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
            Ground-truth class indices; `config.semantic_loss_ignore_index` marks pixels to ignore.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        low_level, high_level = self.backbone(pixel_values)
        logits = self.decode_head(low_level, high_level)
        logits = F.interpolate(
            logits, size=pixel_values.shape[-2:], mode="bilinear", align_corners=self.config.align_corners
        )

        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits, labels.long(), ignore_index=self.config.semantic_loss_ignore_index)

        hidden_states = (low_level, high_level) if output_hidden_states else None
        if not return_dict:
            output = (logits,) + ((hidden_states,) if hidden_states is not None else ())
            return ((loss,) + output) if loss is not None else output
        return SemanticSegmenterOutput(loss=loss, logits=logits, hidden_states=hidden_states)


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


__all__ = ["CPSPreTrainedModel", "CPSForSemanticSegmentation", "CPSEnsembleForSemanticSegmentation", "create_backbone"]
