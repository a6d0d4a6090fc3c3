"""Configuration of one CPS segmentation network: a timm backbone under a DeepLabv3+ head (or, for
plain ViTs, the DPT head UniMatch V2 uses).

CPS trains two of these networks with the same backbone weights and differently initialised
heads; the exported model is one of them, so one config describes everything that is saved.
"""

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

DECODE_HEADS = ("deeplabv3plus", "dpt")


@strict
class CPSConfig(PreTrainedConfig):
    r"""
    backbone (`str`, defaults to `"resnet50"`):
        timm model name. CNNs (ResNet, ConvNeXt, HRNet, ...) are built with `features_only=True`;
        the paper uses deep-stem ResNets (`resnet50s`/`resnet101s`, the original's "v1c") and
        HRNet-W48. Plain ViTs (a timm model with `patch_embed` and `forward_intermediates` and no
        stride-4 level, e.g. DINOv2's `vit_small_patch14_dinov2`) are detected and built whole, with
        `num_classes=0` and `dynamic_img_size=True`; a neck turns their patch-stride token maps into
        the decoder's stride-4 and context inputs.
    backbone_kwargs (`dict`, defaults to `{}`):
        Extra keyword arguments for `timm.create_model` (e.g. `{"drop_path_rate": 0.1}`; for ViTs
        also `depth`, `embed_dim`, `img_size`, ...).
    backbone_out_indices (`list[int]`, *optional*):
        Which backbone feature levels feed the decoder: `[low_level, high_level]`. Default: the
        level with stride 4 and the last level. CNN backbones only (ViTs: `vit_feature_indices`).
    output_stride (`int`, *optional*, defaults to 16):
        Backbone output stride (16 or 8, by dilation). `None` keeps the backbone's own stride
        (for timm models that cannot dilate, e.g. HRNet). A plain ViT runs at its patch stride: 16 (the
        default) or `None` is accepted and ignored, other values are refused.
    multi_grid (`list[int]`, *optional*):
        Unit multi-grid of the last stage (DeepLabv3): block `i` of the last stage gets dilation
        `stage_dilation * multi_grid[i]`. The original CPS code uses `[1, 2, 4]` at output
        stride 16, i.e. dilations 2/4/8. ResNet-family backbones only.
    vit_feature_indices (`list[int]`, *optional*):
        Plain ViTs only: the blocks whose normed outputs the neck taps (0-based; negative counts
        from the last block). Default: four evenly spaced blocks ending at the last (`[2, 5, 8, 11]`
        for 12 blocks), as DINOv2's segmentation recipes. Blocks after the last tap are removed
        from the backbone, so no parameter goes unused.
    decode_head (`str`, defaults to `"deeplabv3plus"`):
        The head: `"deeplabv3plus"` (the paper's; for ViTs through a neck) or `"dpt"`, plain ViTs only:
        DPT's reassemble-and-fuse decoder on four tapped blocks, as UniMatch V2 runs it on DINOv2 (each tap
        projected by a 1x1 conv, resampled to 4x, 2x, 1x and 1/2x the patch grid, fused coarse to fine by
        residual conv units without BatchNorm, then a 3x3 conv, ReLU and the 1x1 classifier at 8x the patch
        grid). Its layers keep PyTorch's default initialisation, as in UniMatch V2.
    dpt_features (`int`, *optional*):
        Channels of the DPT fusion path. Default: UniMatch V2's value for the encoder's width (64 for 384,
        128 for 768, 256 for 1024, 384 for 1536), else a sixth of the width.
    dpt_channels (`list[int]`, *optional*):
        Channels of the four projected taps. Default: UniMatch V2's `[w/8, w/4, w/2, w]` for width `w`
        (its ViT-L and -g use other values: set them here).
    pad_to_patch_multiple (`bool`, defaults to `True`):
        Plain ViTs only: pad the input on the right and bottom to a multiple of the patch size and
        crop the logits back, so any image size works. `False` refuses other sizes.
    aspp_rates (`list[int]`, defaults to `[6, 12, 18]`):
        Dilation rates of the three 3x3 ASPP branches.
    aspp_channels (`int`, defaults to 256):
        Channels of each ASPP branch and of the ASPP output.
    low_level_channels (`int`, defaults to 48):
        Channels of the stride-4 projection in the decoder.
    decoder_channels (`int`, defaults to 256):
        Channels of the two 3x3 decoder convolutions.
    classifier_dropout (`float`, defaults to 0.0):
        Dropout before the classifier (the original uses none).
    align_corners (`bool`, defaults to `True`):
        Bilinear upsampling convention inside the head and for the final resize (the original's).
    norm_eps (`float`, defaults to 1e-5) and norm_momentum (`float`, defaults to 0.1):
        BatchNorm settings of the head (the original's).
    semantic_loss_ignore_index (`int`, defaults to 255):
        Label value ignored by the loss (VOC borders, Cityscapes void).
    backbone_pretrained_source (`str`, *optional*):
        Provenance only: where the backbone weights came from when training started (a timm
        pretrained tag or a file name). Never used to download anything.
    eval_protocol (`dict`, *optional*):
        The inference protocol the trainer scored this network with: `{"mode": "whole" | "slide",
        "crop_size": int | None, "stride": int | None}` (single scale, no flip). `evaluate_cps.py`
        uses it by default, so the same model gives the trainer's numbers. `None` (exports made
        before it was recorded, or models not trained by cps_hf): the dataset's default protocol.
    """

    model_type = "cps_deeplabv3plus"

    backbone: str = "resnet50"
    backbone_kwargs: dict | None = None
    backbone_out_indices: list[int] | tuple[int, ...] | None = None
    output_stride: int | None = 16
    multi_grid: list[int] | tuple[int, ...] | None = None
    vit_feature_indices: list[int] | tuple[int, ...] | None = None
    decode_head: str = "deeplabv3plus"
    dpt_features: int | None = None
    dpt_channels: list[int] | tuple[int, ...] | None = None
    pad_to_patch_multiple: bool = True
    aspp_rates: list[int] | tuple[int, ...] = (6, 12, 18)
    aspp_channels: int = 256
    low_level_channels: int = 48
    decoder_channels: int = 256
    classifier_dropout: float | int = 0.0
    align_corners: bool = True
    norm_eps: float = 1e-5
    norm_momentum: float = 0.1
    semantic_loss_ignore_index: int = 255
    backbone_pretrained_source: str | None = None
    eval_protocol: dict | None = None

    def validate_architecture(self):
        """Fail early, naming the field, instead of deep inside timm or a conv layer."""
        if self.output_stride not in (None, 8, 16, 32):
            raise ValueError(f"CPSConfig.output_stride must be 8, 16, 32 or None, got {self.output_stride!r}")
        if len(self.aspp_rates) != 3:
            raise ValueError(f"CPSConfig.aspp_rates needs three rates (DeepLabv3+), got {list(self.aspp_rates)}")
        if self.backbone_out_indices is not None and len(self.backbone_out_indices) != 2:
            raise ValueError(
                "CPSConfig.backbone_out_indices must be [low_level_index, high_level_index], "
                f"got {list(self.backbone_out_indices)}"
            )
        indices = self.vit_feature_indices
        if indices is not None and (not indices or len(set(indices)) != len(indices)):
            raise ValueError(
                f"CPSConfig.vit_feature_indices must be distinct block indices, at least one, got {list(indices)}"
            )
        if self.decode_head not in DECODE_HEADS:
            raise ValueError(f"CPSConfig.decode_head must be one of {', '.join(DECODE_HEADS)}, got {self.decode_head!r}")
        if self.dpt_channels is not None and (len(self.dpt_channels) != 4 or min(self.dpt_channels) < 1):
            raise ValueError(f"CPSConfig.dpt_channels needs four positive channel counts, got {list(self.dpt_channels)}")
        if self.dpt_features is not None and self.dpt_features < 1:
            raise ValueError(f"CPSConfig.dpt_features must be positive, got {self.dpt_features}")
        if self.num_labels < 1:
            raise ValueError(f"CPSConfig.num_labels must be positive, got {self.num_labels}")

    def validate_eval_protocol(self):
        """evaluate_cps.py evaluates with this by default: a malformed one must fail at load, not mid-evaluation."""
        protocol = self.eval_protocol
        if protocol is None:
            return
        where = "CPSConfig.eval_protocol (config.json)"
        if set(protocol) != {"mode", "crop_size", "stride"}:
            raise ValueError(f"{where} needs exactly the keys crop_size, mode, stride; got {sorted(protocol)}")
        if protocol["mode"] not in ("whole", "slide"):
            raise ValueError(f"{where}['mode'] must be 'whole' or 'slide', got {protocol['mode']!r}")
        for key in ("crop_size", "stride"):
            value = protocol[key]
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{where}[{key!r}] must be a positive integer or null, got {value!r}")
        if protocol["mode"] == "slide" and None in (protocol["crop_size"], protocol["stride"]):
            raise ValueError(f"{where}: mode 'slide' needs a crop_size and a stride, got {protocol}")


@strict
class CPSEnsembleConfig(CPSConfig):
    r"""
    All networks of one CPS run (2 for CPS, N for n-CPS, student and teacher for mean teacher) as one
    model: `CPSEnsembleForSemanticSegmentation` averages their softmax probabilities. Every network has
    the architecture the inherited `CPSConfig` fields describe; a single-network export (`CPSConfig`,
    model type `cps_deeplabv3plus`) is unaffected by this class.

    ensemble_size (`int`, defaults to 2):
        How many networks the model holds (`networks.0`, `networks.1`, ... in its state dict).
    network_names (`list[str]`, *optional*):
        The run's names of the networks, in order (e.g. `["network_1", "network_2"]` or
        `["student", "teacher"]`); provenance for model cards and logs only.
    """

    model_type = "cps_deeplabv3plus_ensemble"

    ensemble_size: int = 2
    network_names: list[str] | tuple[str, ...] | None = None

    def validate_ensemble(self):
        if isinstance(self.ensemble_size, bool) or self.ensemble_size < 1:
            raise ValueError(f"CPSEnsembleConfig.ensemble_size must be a positive integer, got {self.ensemble_size!r}")
        if self.network_names is not None and len(self.network_names) != self.ensemble_size:
            raise ValueError(
                f"CPSEnsembleConfig.network_names has {len(self.network_names)} names for "
                f"ensemble_size={self.ensemble_size}"
            )

    def network_config(self) -> CPSConfig:
        """The `CPSConfig` of one member network: every field but the ensemble's own."""
        values = self.to_dict()
        for key in ("ensemble_size", "network_names", "model_type", "architectures", "auto_map",
                    "transformers_version"):
            values.pop(key, None)
        return CPSConfig.from_dict(values)

    @classmethod
    def from_network_config(cls, config: CPSConfig, ensemble_size: int,
                            network_names: list[str] | None = None) -> "CPSEnsembleConfig":
        """The ensemble of `ensemble_size` networks that `config` describes."""
        values = config.to_dict()
        for key in ("model_type", "architectures", "auto_map", "transformers_version"):
            values.pop(key, None)
        names = None if network_names is None else list(network_names)
        return cls.from_dict({**values, "ensemble_size": int(ensemble_size), "network_names": names})


__all__ = ["CPSConfig", "CPSEnsembleConfig"]
