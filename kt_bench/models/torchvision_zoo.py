"""torchvision classifiers in the zoo, unchanged, with their canonical taps mapped by name."""

from __future__ import annotations

import pickle

from torch import nn

from kt_bench.core.errors import KtBenchError
from kt_bench.core.plain_data import refusal_reason
from kt_bench.models.zoo import register_model

_RESNET_TAPS = {
    "stage1": "layer1",
    "stage2": "layer2",
    "stage3": "layer3",
    "stage4": "layer4",
    "feat": "layer4",
    "pool": "avgpool",
}


def _weights(name: str, weights: str) -> dict:
    """torchvision's ``weights`` for model ``name``, read as plain data from torch's download
    cache (torchvision's own loader would unpickle the cached file in full, running any code
    in it)."""
    import torchvision

    chosen = torchvision.models.get_model_weights(name).verify(weights)
    try:
        return chosen.get_state_dict(progress=True, check_hash=True, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise KtBenchError(f"torchvision weights {chosen} (torch's download cache) cannot be "
                           f"read: {refusal_reason(exc)}") from None


def _register_resnet(name: str) -> None:
    def build(num_classes: int, in_channels: int = 3, weights: str | None = None) -> nn.Module:
        import torchvision

        model = getattr(torchvision.models, name)()
        if weights:
            model.load_state_dict(_weights(name, weights))
        if model.fc.out_features != num_classes:
            model.fc = nn.Linear(model.fc.in_features, num_classes)
        if in_channels != 3:
            old = model.conv1
            model.conv1 = nn.Conv2d(
                in_channels, old.out_channels, old.kernel_size, old.stride, old.padding, bias=False
            )
        model.tap_map = dict(_RESNET_TAPS)
        return model

    build.__doc__ = f"torchvision {name} (ImageNet layout); weights= a torchvision weights name."
    build.__qualname__ = f"tv_{name}"
    register_model(f"tv_{name}")(build)


for _name in ("resnet18", "resnet34", "resnet50", "resnet101"):
    _register_resnet(_name)
