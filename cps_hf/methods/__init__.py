"""Training methods: what one step computes, given the networks and a batch.

One module per family; each registers itself, and `build_method(name, ...)` builds any of them:

- ``supervised`` (supervised.py): one network, L = L_s on the labeled batch.
- ``cps`` and ``cps_cutmix`` (cps.py): two networks supervising each other with their argmax
  (paper eq. 4-6), on labeled+unlabeled images, or on CutMixed unlabeled images.

The contract the loop relies on (base.py): ``num_models``, ``num_trained``,
``num_unlabeled_streams``, ``__call__ -> MethodOutput``, ``init_networks`` and
``after_optimizer_step``.
"""

from . import cps, supervised  # noqa: F401  (registers the methods)
from .base import METHODS, Method, MethodOutput, StepLogs, build_method, register_method, sigmoid_rampup
from .cps import CPSCutMixMethod, CPSMethod
from .supervised import SupervisedMethod

METHOD_NAMES = tuple(METHODS)

__all__ = [
    "METHODS", "METHOD_NAMES", "Method", "MethodOutput", "StepLogs", "build_method", "register_method",
    "sigmoid_rampup", "CPSMethod", "CPSCutMixMethod", "SupervisedMethod",
]
