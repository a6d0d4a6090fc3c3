"""Image processor for CPS models: ImageNet normalisation at native resolution by default.

DeepLabv3+ is fully convolutional and CPS models are evaluated on whole images (VOC) or
sliding windows (Cityscapes), so unlike SegFormer's processor we do not squash images to
512x512 unless asked (`do_resize=True` with `size`). Logits come back at the input size, and
`post_process_semantic_segmentation` resizes them to each requested target size.
"""

from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from transformers.models.segformer.image_processing_segformer import SegformerImageProcessor


class CPSImageProcessor(SegformerImageProcessor):
    """SegFormer's processor (resize, rescale, normalise, label handling, post-processing) with CPS defaults."""

    model_input_names = ["pixel_values"]
    image_mean = IMAGENET_DEFAULT_MEAN
    image_std = IMAGENET_DEFAULT_STD
    do_resize = False
    size = {"height": 512, "width": 512}
    do_reduce_labels = False


__all__ = ["CPSImageProcessor"]
