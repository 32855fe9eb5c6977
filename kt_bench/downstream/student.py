"""A finished cell's student, rebuilt from its ``config.json`` and loaded from its checkpoint,
for the downstream evaluations."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kt_bench.core import atomic
from kt_bench.core.errors import KtBenchError, first_line
from kt_bench.core.options import DOWNLOAD_OPTIONS, Spec
from kt_bench.data import dataset_info
from kt_bench.models import build_model
from kt_bench.training.checkpoints import load_plain

#: Where a training checkpoint keeps the student's weights: the ``trainee`` state dict (the
#: student and its method's parts) under this prefix.
STUDENT_PREFIX = "student."
#: Options of a student spec that give its starting weights, not its architecture: the trained
#: weights replace them.
STARTING_WEIGHTS = (*DOWNLOAD_OPTIONS, "checkpoint")


def student_architecture(config: dict[str, Any]) -> tuple[Spec, Spec]:
    """(student spec without its starting weights, training dataset spec) of a cell's
    resolved ``config`` (its ``config.json``)."""
    student = Spec.parse(config["student"], "config.json: student")
    student = Spec(student.name, {k: v for k, v in student.options.items()
                                  if k not in STARTING_WEIGHTS})
    return student, Spec.parse(config["dataset"], "config.json: dataset")


def student_input(dataset: Spec) -> tuple[int, int, int]:
    """The (channels, height, width) of the images a student of ``dataset`` trained on."""
    info = dataset_info(dataset)
    return info.in_channels, info.image_size, info.image_size


def build_student(config: dict[str, Any]) -> nn.Module:
    """The architecture of the student of a cell's ``config``, with fresh weights."""
    student, dataset = student_architecture(config)
    info = dataset_info(dataset)
    return build_model(student, info.num_classes, info.in_channels, info.image_size)


def trained_student(cell_dir: Path) -> nn.Module:
    """The student that cell folder ``cell_dir`` trained: its ``config.json``'s architecture
    with the weights of its ``checkpoint.pt``, on the CPU, in eval mode; a one-line error
    where either file is missing or holds no such student."""
    config_path, checkpoint = cell_dir / "config.json", cell_dir / "checkpoint.pt"
    if not config_path.is_file() or not checkpoint.is_file():
        missing = config_path if not config_path.is_file() else checkpoint
        raise KtBenchError(f"{missing}: no such file; a downstream evaluation needs the "
                           "cell's config.json and checkpoint.pt")
    config = atomic.read_json(config_path)
    student = build_student(config)
    try:
        state = load_plain(checkpoint)
    except OSError as exc:
        raise KtBenchError(f"cannot read {checkpoint}: {exc.strerror or first_line(exc)}"
                           ) from None
    trainee = state.get("trainee") if isinstance(state, dict) else None
    if not isinstance(trainee, dict):
        raise KtBenchError(f"{checkpoint} holds no trained student (no 'trainee' weights)")
    weights = {k[len(STUDENT_PREFIX):]: v for k, v in trainee.items()
               if k.startswith(STUDENT_PREFIX)}
    try:
        student.load_state_dict(weights)
    except RuntimeError as exc:
        raise KtBenchError(f"{checkpoint}: its student weights do not fit the "
                           f"architecture of config.json: {first_line(exc)}") from None
    return student.eval()


def pooled(features: torch.Tensor) -> torch.Tensor:
    """A tap's value as one vector per image: a (B, C, H, W) map averaged over its positions,
    a (B, N, C) token sequence over its tokens, a (B, C) vector as it is."""
    if features.dim() == 4:
        return features.mean(dim=(2, 3))
    if features.dim() == 3:
        return features.mean(dim=1)
    return features.flatten(1)


def weights_digest(model: nn.Module) -> str:
    """A SHA-256 (hex) of ``model``'s parameters and buffers, names and values: equal for
    equal weights, whatever the file they came from."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        value = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(str(value.dtype).encode())
        digest.update(value.view(torch.uint8).numpy().tobytes() if value.numel() else b"")
    return digest.hexdigest()


#: The autocast dtype of each mixed precision (``no``: none).
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_for(device: torch.device, precision: str) -> torch.autocast:
    """The autocast context of ``precision`` (``no``, ``bf16``, ``fp16``) on ``device``."""
    dtype = AUTOCAST_DTYPES.get(precision)
    return torch.autocast(device.type, dtype=dtype, enabled=dtype is not None)


def input_channels(model: nn.Module) -> int | None:
    """The channels of the images ``model`` takes: its first convolution's input channels
    (None for a model without convolutions)."""
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return None if first is None else first.in_channels
