"""Training methods: what one step computes, given the networks and a batch.

One module per family; each registers itself, and `build_method(name, ...)` builds any of them:

- ``supervised`` (supervised.py): one network, L = L_s on the labeled batch.
- ``cps`` and ``cps_cutmix`` (cps.py): two networks supervising each other with their argmax
  (paper eq. 4-6), on labeled+unlabeled images, or on CutMixed unlabeled images.
- ``ncps`` and ``ncps_cutmix`` (ncps.py): n-CPS (Filipiak et al. 2021), N networks (``num_networks``),
  each supervised by every other one's argmax; N = 2 is ``cps`` / ``cps_cutmix`` exactly.
- ``mean_teacher`` and ``mean_teacher_cutmix`` (mean_teacher.py): a student and its EMA teacher
  (eq. 8, Figure 1c); the teacher's predictions supervise the student's on a noised view, or on
  CutMixed unlabeled images (CutMix-Seg).
- ``cpc`` (cpc.py): two networks, squared L2 between their softmax probabilities (eq. 7, Table 4).
- ``sps`` and ``sps_cutmix`` (sps.py): one network supervised by its own argmax (eq. 9, Table 6).

The contract the loop relies on (base.py): ``num_models``, ``num_trained``,
``num_unlabeled_streams``, ``__call__ -> MethodOutput``, ``init_networks`` and
``after_optimizer_step``.
"""

from . import cpc, cps, mean_teacher, ncps, sps, supervised  # noqa: F401  (registers the methods)
from .base import METHODS, Method, MethodOutput, StepLogs, build_method, register_method, sigmoid_rampup
from .cpc import CPCMethod
from .cps import CPSCutMixMethod, CPSMethod
from .mean_teacher import MeanTeacherCutMixMethod, MeanTeacherMethod
from .ncps import NCPSCutMixMethod, NCPSMethod
from .sps import SPSCutMixMethod, SPSMethod
from .supervised import SupervisedMethod

METHOD_NAMES = tuple(METHODS)

__all__ = [
    "METHODS", "METHOD_NAMES", "Method", "MethodOutput", "StepLogs", "build_method", "register_method",
    "sigmoid_rampup", "CPSMethod", "CPSCutMixMethod", "NCPSMethod", "NCPSCutMixMethod",
    "SupervisedMethod", "MeanTeacherMethod", "MeanTeacherCutMixMethod",
    "CPCMethod", "SPSMethod", "SPSCutMixMethod",
]
