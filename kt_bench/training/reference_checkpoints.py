"""RepDistiller's published teachers: their weight names, and where their files lie.

RepDistiller (R = HobbitLong/RepDistiller) published the CIFAR-100 teachers its numbers were
measured with as ``<R model name>_vanilla/ckpt_epoch_240.pth`` files holding
``{'model': state_dict, ...}`` (R:scripts/fetch_pretrained_teachers.sh); mdistiller ships the
same set as ``cifar_teachers.tar`` (M:mdistiller/models/cifar/__init__.py). Their state dicts
name the weights after R's module names, which differ from kt-bench's for two families:

* CIFAR ResNet (R:models/resnet.py): the projected shortcut is ``downsample`` (kt: ``shortcut``).
* WRN (R:models/wrn.py): a stage's blocks sit in ``block<i>.layer.<j>`` (kt: ``block<i>.<j>``),
  the shortcut conv is ``convShortcut`` (kt: ``shortcut``) and the final BN is ``bn1``
  (kt: ``bn``).
* VGG (R:models/vgg.py): the same names as kt-bench's (R drops each block's last ReLU, which
  holds no weights, so the indices of the conv and BN layers agree).

A model says which layout its family's reference checkpoints use with a ``reference_layout``
class attribute naming a row of ``LAYOUTS``; a model without one (e.g. the cross-architecture
models, written with R's exact module names) maps by identity.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

from torch import nn

from kt_bench.core.errors import KtBenchError

Rules = tuple[tuple[str, str], ...]

#: layout name -> (rules turning a key in R's layout into kt-bench's module name, rules
#: turning kt-bench's name back into R's); each rule is a (pattern, replacement) for re.sub,
#: applied in order.
LAYOUTS: dict[str, tuple[Rules, Rules]] = {
    "identity": ((), ()),
    "repdistiller_resnet": (
        ((r"\.downsample\.", ".shortcut."),),
        ((r"\.shortcut\.", ".downsample."),),
    ),
    "repdistiller_wrn": (
        ((r"^(block\d+)\.layer\.", r"\1."),
         (r"\.convShortcut\.", ".shortcut."),
         (r"^bn1\.", "bn.")),  # the top-level final BN only; the blocks' bn1 keep their name
        ((r"^(block\d+)\.(\d+)\.", r"\1.layer.\2."),
         (r"\.shortcut\.", ".convShortcut."),
         (r"^bn\.", "bn1.")),
    ),
    "repdistiller_vgg": ((), ()),
}

#: R's model names (R:models/__init__.py ``model_dict``).
R_MODEL_NAMES = frozenset({
    "resnet8", "resnet14", "resnet20", "resnet32", "resnet44", "resnet56", "resnet110",
    "resnet8x4", "resnet32x4", "ResNet50", "wrn_16_1", "wrn_16_2", "wrn_40_1", "wrn_40_2",
    "vgg8", "vgg11", "vgg13", "vgg16", "vgg19", "mobile_half", "mobile_full", "ShuffleV1",
    "ShuffleV2",
})

#: kt-bench model names that differ from R's name for the same network.
KT_TO_R_NAME: dict[str, str] = {
    "resnet50": "ResNet50",
    "mobilenetv2": "mobile_half",
    "shufflev1": "ShuffleV1",
    "shufflev2": "ShuffleV2",
}

#: The teachers R published (R:scripts/fetch_pretrained_teachers.sh), by R's model name.
PUBLISHED_TEACHERS = ("wrn_40_2", "resnet56", "resnet110", "resnet32x4", "vgg13", "ResNet50")

#: The file name inside each ``<R name>_vanilla`` folder.
CHECKPOINT_NAME = "ckpt_epoch_240.pth"


def layout_of(model: nn.Module) -> str:
    """The name of the ``LAYOUTS`` row that maps ``model``'s reference checkpoints."""
    layout = getattr(model, "reference_layout", "identity")
    if layout not in LAYOUTS:
        raise KtBenchError(f"model {type(model).__name__} names an unknown reference layout "
                           f"'{layout}'; known: {', '.join(sorted(LAYOUTS))}")
    return layout


def _apply(rules: Rules, key: str) -> str:
    for pattern, replacement in rules:
        key = re.sub(pattern, replacement, key)
    return key


def reference_key(layout: str, key: str) -> str:
    """``key``, a weight name in R's layout ``layout``, as kt-bench names it."""
    return _apply(LAYOUTS[layout][0], key)


def kt_to_reference_key(layout: str, key: str) -> str:
    """``key``, a kt-bench weight name, as R's layout ``layout`` names it."""
    return _apply(LAYOUTS[layout][1], key)


def from_reference_layout(model: nn.Module, state: Mapping[str, object]) -> dict[str, object]:
    """``state`` (a state dict in R's layout for ``model``'s family) under kt-bench's names.

    Two keys that land on one name keep the first; the second is returned under its own
    name, so that it shows up as an unexpected key.
    """
    layout = layout_of(model)
    out: dict[str, object] = {}
    for key, value in state.items():
        new = reference_key(layout, key)
        out[key if new in out else new] = value
    return out


def _mismatch(expected: list[str], state: Mapping[str, object]) -> tuple[list[str], list[str]]:
    """(missing, unexpected) keys of ``state`` against ``expected``; a missing BatchNorm
    ``num_batches_tracked`` is no mismatch (files from older PyTorch lack it, and BatchNorm
    fills it in)."""
    known = set(expected)
    missing = [k for k in expected
               if k not in state and not k.endswith(".num_batches_tracked")]
    unexpected = [k for k in state if k not in known]
    return missing, unexpected


def _describe(missing: list[str], unexpected: list[str]) -> str:
    parts = []
    if missing:
        parts.append(f"first missing key '{missing[0]}' ({len(missing)} missing)")
    if unexpected:
        parts.append(f"first unexpected key '{unexpected[0]}' ({len(unexpected)} unexpected)")
    return ", ".join(parts)


def fit_state(model: nn.Module, state: Mapping[str, object], source: str) -> dict[str, object]:
    """``state`` with kt-bench's names for ``model``: as it is when its keys are kt-bench's,
    else mapped from R's layout when that fits; otherwise a one-line error that starts with
    ``source`` and names the first missing and unexpected key of the closer layout."""
    expected = list(model.state_dict())
    own = dict(state)
    missing, unexpected = _mismatch(expected, own)
    if not missing and not unexpected:
        return own
    layout = layout_of(model)
    if layout == "identity":
        raise KtBenchError(f"{source} does not fit the teacher architecture "
                           f"({type(model).__name__}): {_describe(missing, unexpected)}")
    mapped = from_reference_layout(model, own)
    r_missing, r_unexpected = _mismatch(expected, mapped)
    if not r_missing and not r_unexpected:
        return mapped
    # name the keys of the layout the file comes closer to (kt-bench's on a tie), R's by
    # R's own names so that the user can find them in the file
    if len(r_missing) + len(r_unexpected) < len(missing) + len(unexpected):
        renamed = {reference_key(layout, k): k for k in own}
        closer = "RepDistiller's"
        detail = _describe([kt_to_reference_key(layout, k) for k in r_missing],
                           [renamed.get(k, k) for k in r_unexpected])
    else:
        closer, detail = "kt-bench's", _describe(missing, unexpected)
    raise KtBenchError(f"{source} does not fit the teacher architecture "
                       f"({type(model).__name__}) in kt-bench's layout nor in RepDistiller's; "
                       f"closer to {closer}: {detail}")


def reference_name(teacher_name: str) -> str:
    """R's model name for the kt-bench model ``teacher_name`` (R:models/__init__.py)."""
    name = KT_TO_R_NAME.get(teacher_name, teacher_name)
    if name not in R_MODEL_NAMES:
        raise KtBenchError(f"model '{teacher_name}' has no RepDistiller counterpart; "
                           f"published teachers: {', '.join(PUBLISHED_TEACHERS)}")
    return name


def reference_teacher_path(folder: str | Path, teacher_name: str) -> Path:
    """Where the unpacked published teachers ``folder`` holds ``teacher_name``'s weights:
    ``<folder>/<R's model name>_vanilla/ckpt_epoch_240.pth``."""
    return Path(folder) / f"{reference_name(teacher_name)}_vanilla" / CHECKPOINT_NAME
