"""The baseline every semi-supervised method is compared with: labeled images only."""

from __future__ import annotations

from .base import Method, MethodOutput, StepLogs, logits_of, register_method


@register_method
class SupervisedMethod(Method):
    """The baseline: one network trained on the labelled batch only."""

    name = "supervised"
    num_models = 1
    num_unlabeled_streams = 0

    def compute(self, models, batch, step, generator):
        logs = StepLogs()
        labeled = batch["labeled"]
        logits = logits_of(models[0], labeled["pixel_values"])
        loss = self._supervised_losses([logits], labeled["labels"], logs)
        logs.add("loss", loss)
        return MethodOutput(loss, logs.to_floats())
