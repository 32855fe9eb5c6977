"""The model zoo: every entry builds an nn.Module carrying a ``tap_map`` of canonical tap names.

Canonical taps shared by the zoo: ``stage1``..``stageN`` (output of each stage), ``feat`` (the
last feature map before global pooling, post-activation), ``feat_pre`` (the same map before its
final activation, where the architecture has one), ``pool`` (pooled features) and ``logits``.

Every module of this package but the infrastructure (``zoo``, ``taps``) and private ``_``
ones is imported here, so a new built-in model is one file that registers itself with
``@register_model``; no list names it.
"""

from kt_bench.core.registry import import_modules
from kt_bench.models.zoo import MODELS, build_model, count_parameters, register_model

#: Modules of this package that register no model.
INFRASTRUCTURE = ("macs", "taps", "zoo")

import_modules(__name__, __path__, INFRASTRUCTURE)

__all__ = ["MODELS", "build_model", "count_parameters", "register_model"]
