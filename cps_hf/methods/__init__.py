"""Training methods: what one step computes, given the networks and a batch.

One module per family; each registers itself, and `build_method(name, ...)` builds any of them:

- ``supervised`` (supervised.py): one network, L = L_s on the labeled batch.
- ``cps`` and ``cps_cutmix`` (cps.py): two networks supervising each other with their argmax
  (paper eq. 4-6), on labeled+unlabeled images, or on CutMixed unlabeled images.
- ``ncps`` and ``ncps_cutmix`` (ncps.py): n-CPS (Filipiak et al. 2021), N networks (``num_networks``),
  each supervised by every other one's argmax, averaged over its peers as the n-CPS code does;
  N = 2 is ``cps`` / ``cps_cutmix`` exactly.
- ``mean_teacher`` and ``mean_teacher_cutmix`` (mean_teacher.py): a student and its EMA teacher
  (eq. 8, Figure 1c), as PixelSSL's MT and CutMix-Seg's scripts run them; the teacher's predictions
  supervise the student's on the same unlabeled images, or on CutMixed ones (CutMix-Seg).
- ``cpc`` (cpc.py): two networks, squared L2 between their softmax probabilities (eq. 7, Table 4).
- ``sps`` and ``sps_cutmix`` (sps.py): one network supervised by its own argmax (eq. 9, Table 6).
- weak-to-strong consistency (shared parts in weak_to_strong.py): pseudo labels from a weak view supervise
  strong views of the same geometry: ``fixmatch`` (fixmatch.py: UniMatch's, or V2's with an EMA teacher),
  ``unimatch`` and ``unimatch_v2`` (unimatch.py: UniMatch V1 and V2 as their code runs them) and
  ``cps_strong`` (cps_strong.py: CPS across strong views).

The contract the loop relies on (base.py): ``num_models``, ``num_trained``,
``num_unlabeled_streams``, ``__call__ -> MethodOutput``, ``init_networks``, ``set_steps_per_epoch``
and ``after_optimizer_step``. Where a method has public reference code, its defaults are that code's.
"""

from . import cpc, cps, cps_strong, fixmatch, mean_teacher, ncps, sps, supervised, unimatch  # noqa: F401  (registers)
from .base import METHODS, Method, MethodOutput, StepLogs, build_method, register_method, sigmoid_rampup
from .cpc import CPCMethod
from .cps import CPSCutMixMethod, CPSMethod
from .cps_strong import CPSStrongMethod
from .fixmatch import FixMatchMethod
from .mean_teacher import MeanTeacherCutMixMethod, MeanTeacherMethod
from .ncps import NCPSCutMixMethod, NCPSMethod
from .sps import SPSCutMixMethod, SPSMethod
from .supervised import SupervisedMethod
from .unimatch import UniMatchMethod, UniMatchV2Method

METHOD_NAMES = tuple(METHODS)

__all__ = [
    "METHODS", "METHOD_NAMES", "Method", "MethodOutput", "StepLogs", "build_method", "register_method",
    "sigmoid_rampup", "CPSMethod", "CPSCutMixMethod", "NCPSMethod", "NCPSCutMixMethod",
    "SupervisedMethod", "MeanTeacherMethod", "MeanTeacherCutMixMethod",
    "CPCMethod", "SPSMethod", "SPSCutMixMethod", "FixMatchMethod", "UniMatchMethod", "UniMatchV2Method", "CPSStrongMethod",
]
