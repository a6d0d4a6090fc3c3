"""cps_hf: Cross Pseudo Supervision (CVPR 2021) for semi-supervised segmentation on the Hugging Face stack.

Importing the package registers the config, model and image processor with transformers' Auto
classes, so `AutoModelForSemanticSegmentation.from_pretrained(dir)` and
`pipeline("image-segmentation", model=dir)` work on exported CPS models.
"""

from transformers import AutoConfig, AutoImageProcessor, AutoModelForSemanticSegmentation

from .configuration_cps import CPSConfig
from .image_processing_cps import CPSImageProcessor
from .modeling_cps import CPSForSemanticSegmentation, CPSPreTrainedModel

__version__ = "0.1.0"

AutoConfig.register(CPSConfig.model_type, CPSConfig, exist_ok=True)
AutoModelForSemanticSegmentation.register(CPSConfig, CPSForSemanticSegmentation, exist_ok=True)
AutoImageProcessor.register(CPSConfig, image_processor_classes={"torchvision": CPSImageProcessor}, exist_ok=True)

__all__ = ["CPSConfig", "CPSForSemanticSegmentation", "CPSPreTrainedModel", "CPSImageProcessor", "__version__"]
