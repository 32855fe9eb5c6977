"""The model zoo: every entry builds an nn.Module carrying a ``tap_map`` of canonical tap names.

Canonical taps shared by the zoo: ``stage1``..``stageN`` (output of each stage), ``feat`` (the
last feature map before global pooling, post-activation), ``feat_pre`` (the same map before its
final activation, where the architecture has one), ``pool`` (pooled features) and ``logits``.
"""

from kt_bench.models.zoo import MODELS, build_model, count_parameters, register_model

# Importing the zoo modules registers their entries.
from kt_bench.models import (  # noqa: E402,F401  isort: skip
    cifar_resnet, cifar_resnet50, inception_bn, mobilenetv2, preact_resnet, shufflenetv1,
    shufflenetv2, torchvision_zoo, vgg, wrn)

__all__ = ["MODELS", "build_model", "count_parameters", "register_model"]
