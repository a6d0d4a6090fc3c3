"""cps_hf: Cross Pseudo Supervision (CVPR 2021) for semi-supervised segmentation on the Hugging Face stack.

Importing the package registers the config, model and image processor with transformers' Auto
classes, so `AutoModelForSemanticSegmentation.from_pretrained(dir)` and
`pipeline("image-segmentation", model=dir)` work on exported CPS models: no prompt, no warning.
"""

from transformers import AutoConfig, AutoImageProcessor, AutoModelForSemanticSegmentation, AutoVideoProcessor
from transformers.models.auto import modeling_auto

from .configuration_cps import CPSConfig, CPSEnsembleConfig
from .image_processing_cps import CPSImageProcessor
from .modeling_cps import CPSEnsembleForSemanticSegmentation, CPSForSemanticSegmentation, CPSPreTrainedModel

__version__ = "0.1.0"


def _register_auto_classes() -> None:
    """The Auto classes that `from_pretrained` and `pipeline("image-segmentation")` consult.

    Two entries go beyond the obvious three, both for the pipeline on an export with `auto_map`:
    - "no video processor": the pipeline also probes `AutoVideoProcessor`, which derives a remote
      `image_processing_cps.CPSVideoProcessor` from the image processor's `auto_map`; with nothing
      local registered for CPSConfig it asks "run the custom code? [y/N]" and waits 15 s in a
      terminal. An empty registration makes the local answer "none" (no prompt, no remote code).
    - the semantic-segmentation names table: the image-segmentation pipeline checks the model class
      against a merged copy of these tables that loses registered models, and logs "not supported".
      Entries whose model type has no built-in config are invisible to the Auto classes themselves.
    The ensemble of a run's networks (`CPSEnsembleConfig`, its own model type) gets the same entries:
    the Auto classes map one config class to one model class, so single-network exports keep
    loading as `CPSForSemanticSegmentation` and ensemble exports as `CPSEnsembleForSemanticSegmentation`.
    """
    for config_class, model_class in ((CPSConfig, CPSForSemanticSegmentation),
                                      (CPSEnsembleConfig, CPSEnsembleForSemanticSegmentation)):
        AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
        AutoModelForSemanticSegmentation.register(config_class, model_class, exist_ok=True)
        AutoImageProcessor.register(config_class, image_processor_classes={"torchvision": CPSImageProcessor},
                                    exist_ok=True)
        AutoVideoProcessor.register(config_class, video_processor_classes={}, exist_ok=True)
        modeling_auto.MODEL_FOR_SEMANTIC_SEGMENTATION_MAPPING_NAMES.setdefault(config_class.model_type,
                                                                                model_class.__name__)


_register_auto_classes()

__all__ = ["CPSConfig", "CPSEnsembleConfig", "CPSForSemanticSegmentation", "CPSEnsembleForSemanticSegmentation",
           "CPSPreTrainedModel", "CPSImageProcessor", "__version__"]
