"""timm's models as teachers and students: ``timm:<model name>``, with canonical taps for any
architecture.

The rest of a spec's table goes to timm's ``create_model`` (e.g. ``patch_size``,
``drop_path_rate``); the class count and input channels come from the dataset, and so does
``img_size`` for the architectures that take one (ViT, DeiT, Swin, Mixer, ...), unless the
table gives it.

Taps, from timm's ``feature_info`` (the blocks timm itself names as feature outputs):

* hierarchical models (ResNet, ConvNeXt, EfficientNet, Swin, ...): ``stage1..N`` are the
  feature outputs of rising stride; a first one at stride 2 or less, before a deeper one, is the
  stem, ``stage0``. ``feat`` is the map the global pooling reads (``forward_features``' output),
  ``pool`` the classifier's input. ResNets expose the pre-activation maps too: ``stageK_pre``
  and ``feat_pre`` (each stage's last residual sum before its final ReLU) and
  ``bn_before_relu`` (that block's last BatchNorm), as the CIFAR zoo's ResNets do.
* isotropic models (ViT, DeiT, Mixer: every block at one stride): the blocks are cut into four
  equal stages, ``stageK`` being the output of block ``round(K·depth/4) - 1`` (blocks 2, 5, 8,
  11 of a 12-block ViT); ``feat`` is the final norm's output, ``pool`` the classifier's input.

A token output reaches a method as an image-like map (B, C, H, W): the class and distillation
tokens (timm's ``num_prefix_tokens``) are dropped and the patch tokens reshaped to their square
grid; a channels-last output (Swin's, timm's ``output_fmt = "NHWC"``) is permuted to channels
first. So every feature method reads CNN and transformer taps alike.
"""

from __future__ import annotations

import difflib
import functools
import math
import pickle
import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kt_bench.core.errors import ConfigError, KtBenchError, UnknownNameError, first_line
from kt_bench.core.plain_data import refusal_reason
from kt_bench.core.registry import Family
from kt_bench.models.zoo import MODELS

#: How to install timm, named in every error about it missing.
TIMM_EXTRA = "pip install 'kt-bench[timm]'"
#: The prefix of timm's models in a grid.
PREFIX = "timm"
#: Stages an isotropic model's blocks are cut into.
ISOTROPIC_STAGES = 4
#: timm families whose stages end in a residual sum or a linear projection, with no activation
#: after it: there each stage's output is its own pre-activation map (``stageK_pre``).
LINEAR_STAGE_ENDS = ("ConvNeXt", "EfficientNet", "SwinTransformer", "VisionTransformer",
                     "VisionTransformerDistilled", "MlpMixer")
#: Those of them whose ``feat`` has no activation either (``feat_pre`` is ``feat``);
#: EfficientNet's last map comes out of an activated BatchNorm.
LINEAR_FEAT = ("ConvNeXt", "SwinTransformer", "VisionTransformer", "VisionTransformerDistilled",
               "MlpMixer")


def _timm() -> Any:
    """The timm package; a one-line error naming the extra where it is not installed."""
    try:
        import timm
    except ImportError:
        raise KtBenchError(f"timm models need the timm package: {TIMM_EXTRA}") from None
    return timm


def timm_names(pattern: str = "*") -> list[str]:
    """timm's model names matching the shell-style ``pattern`` ([] without timm)."""
    try:
        import timm
    except ImportError:
        return []
    return list(timm.list_models(pattern))


def _resolve(name: str) -> Callable[..., nn.Module]:
    """The builder of timm model ``name``; an unknown name is a one-line error."""
    timm = _timm()
    if not timm.is_model(name):
        hint = difflib.get_close_matches(name, timm.list_models(), n=3)
        close = f" (close: {', '.join(hint)})" if hint else ""
        raise UnknownNameError(f"unknown timm model '{name}'{close}; see timm's names with "
                               f"kt-bench list models 'timm:PATTERN' (e.g. 'timm:vit_*')")
    return _builder(name)


def _builder(model_name: str) -> Callable[..., nn.Module]:
    def build(num_classes: int, in_channels: int = 3, image_size: int | None = None,
              pretrained: bool = False, checkpoint: str | None = None,
              **options: Any) -> nn.Module:
        model = _create(model_name, num_classes, in_channels, image_size, pretrained, options)
        if checkpoint:
            load_weights(model, checkpoint)
        add_taps(model)
        return model

    build.__doc__ = (f"timm's {model_name}; pretrained = true loads timm's weights (internet), "
                     "checkpoint = PATH a local file; other options go to timm.create_model.")
    build.__qualname__ = build.__name__ = f"timm_{model_name}"
    return build


def _create(model_name: str, num_classes: int, in_channels: int, image_size: int | None,
            pretrained: bool, options: dict[str, Any]) -> nn.Module:
    """``timm.create_model`` for the dataset's classes, channels and, where the architecture
    takes it and the spec does not set it, image size."""
    timm = _timm()
    given = [k for k in ("num_classes", "in_chans") if k in options]
    if given:
        raise ConfigError(f"timm model '{model_name}': option '{given[0]}' comes from the "
                          "dataset; leave it out")
    kwargs = {"num_classes": num_classes, "in_chans": in_channels, **options}
    sized = image_size is not None and "img_size" not in options
    what = f"timm model '{model_name}'"
    try:
        try:
            return timm.create_model(model_name, pretrained=pretrained,
                                     **({"img_size": image_size} if sized else {}), **kwargs)
        except TypeError as exc:
            if not sized or "img_size" not in str(exc):
                raise
            # a fixed-size architecture (a CNN): it takes any image size without being told
            return timm.create_model(model_name, pretrained=pretrained, **kwargs)
    except TypeError as exc:
        raise ConfigError(f"{what}: {first_line(exc)}; the spec's other options go to "
                          "timm.create_model") from None
    except (OSError, RuntimeError, ValueError) as exc:
        if pretrained:
            raise KtBenchError(f"{what}: timm could not load its pretrained weights: "
                               f"{first_line(exc)}; without internet give checkpoint = PATH "
                               "(a local file) instead") from None
        raise ConfigError(f"{what} cannot be built with {kwargs}: {first_line(exc)}") from None


def _read_state(path: Path) -> Mapping[str, torch.Tensor]:
    """The tensors a checkpoint file holds, read as plain data (safetensors, or a torch file
    loaded with ``weights_only``), unwrapped from a ``model``/``state_dict`` entry."""
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise KtBenchError(f"{path} cannot be read as plain data: {refusal_reason(exc)}"
                           ) from None
    except Exception as exc:  # noqa: BLE001 - cut short, not a checkpoint: torch's or safetensors'
        raise KtBenchError(f"checkpoint {path} cannot be read ({first_line(exc)}); accepted: "
                           "a state dict saved by torch.save or as safetensors") from None
    for key in ("state_dict_ema", "model_ema", "state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
            break
    if not isinstance(state, Mapping):
        raise KtBenchError(f"{path} holds no state dict (a mapping of weight names to tensors)")
    return {k.removeprefix("module."): v for k, v in state.items()}


def _names(config: Mapping[str, Any], key: str) -> tuple[str, ...]:
    value = config.get(key) or ()
    return (value,) if isinstance(value, str) else tuple(value)


def load_weights(model: nn.Module, checkpoint: str) -> None:
    """Load a local weights file into timm ``model`` as timm's pretrained loading does: a
    classifier of another class count stays freshly initialised, a first convolution of other
    input channels is adapted (timm's ``adapt_input_conv``); any other difference is a one-line
    error naming the first weight."""
    path = Path(checkpoint).expanduser()
    if not path.is_file():
        raise KtBenchError(f"checkpoint {path}: no such file")
    state = dict(_read_state(path))
    # timm's own conversion for the family (e.g. a ViT's position embeddings resampled to the
    # dataset's patch grid, old key names renamed), as its pretrained loading applies it
    convert = getattr(sys.modules.get(type(model).__module__), "checkpoint_filter_fn", None)
    if callable(convert):
        try:
            state = dict(convert(state, model))
        except Exception as exc:  # noqa: BLE001 - timm's converter on a foreign file
            raise KtBenchError(f"checkpoint {path} cannot be converted for timm's "
                               f"{type(model).__name__}: {first_line(exc)}") from None
    own = model.state_dict()
    config = getattr(model, "pretrained_cfg", {}) or {}
    heads = _names(config, "classifier")
    for key in _names(config, "first_conv"):
        weight = f"{key}.weight"
        if weight in state and weight in own and state[weight].shape[1] != own[weight].shape[1]:
            from timm.models import adapt_input_conv

            state[weight] = adapt_input_conv(own[weight].shape[1], state[weight])
    for key in list(state):
        if (key in own and state[key].shape != own[key].shape
                and any(key.startswith(f"{h}.") for h in heads)):
            del state[key]  # another class count: the head is trained anew
    missing = [k for k in own if k not in state
               and not any(k.startswith(f"{h}.") for h in heads)]
    unexpected = [k for k in state if k not in own]
    wrong = [k for k in state if k in own and state[k].shape != own[k].shape]
    for keys, what in ((missing, "lacks"), (unexpected, "has an unknown weight"),
                       (wrong, "has another shape for")):
        if keys:
            raise KtBenchError(f"checkpoint {path} does not fit timm's {type(model).__name__}: "
                               f"it {what} '{keys[0]}' ({len(keys)} such)")
    model.load_state_dict(state, strict=False)


def tokens_to_map(x: torch.Tensor, prefix_tokens: int = 0) -> torch.Tensor:
    """A token output (B, N, C) as an image-like map (B, C, H, W): the first
    ``prefix_tokens`` (class, distillation) tokens dropped, the patch tokens laid out on
    their square grid. A 4-D input is returned unchanged."""
    if x.ndim != 3:
        return x
    b, n, c = x.shape
    patches = n - prefix_tokens
    side = math.isqrt(patches)
    if side * side != patches:
        raise KtBenchError(f"a token output of {n} tokens ({prefix_tokens} prefix) has no "
                           "square grid of patches; accepted: square images")
    return x[:, prefix_tokens:].transpose(1, 2).reshape(b, c, side, side)


def channels_last_to_first(x: torch.Tensor) -> torch.Tensor:
    """A channels-last map (B, H, W, C) as (B, C, H, W)."""
    return x.permute(0, 3, 1, 2) if x.ndim == 4 else x


def _module_name(model: nn.Module, names: tuple[str, ...]) -> str | None:
    modules = dict(model.named_modules())
    return next((n for n in names if n in modules), None)


def _global_pool(model: nn.Module) -> str | None:
    """The name of the module that pools the last feature map (``global_pool``)."""
    return next((n for n, _ in model.named_modules() if n.split(".")[-1] == "global_pool"),
                None)


def _stage_modules(info: list[dict]) -> tuple[str | None, list[str]]:
    """(the stem's module or None, the modules ending stage 1..N) from ``feature_info``."""
    reductions = [d["reduction"] for d in info]
    if len(set(reductions)) == 1 and len(info) >= ISOTROPIC_STAGES:
        depth = len(info)
        ends = [round(k * depth / ISOTROPIC_STAGES) - 1 for k in range(1, ISOTROPIC_STAGES + 1)]
        return None, [info[i]["module"] for i in ends]
    if len(info) > 1 and reductions[0] <= 2 < reductions[1]:
        return info[0]["module"], [d["module"] for d in info[1:]]
    return None, [d["module"] for d in info]


def _preactivation(model: nn.Module, stages: list[str]) -> dict[str, tuple[str, str]]:
    """For ResNet-like stages (a sequence of blocks ending with ``act2``/``act3`` after the
    residual sum): each stage's pre-activation tap and the BatchNorm before its ReLU."""
    modules = dict(model.named_modules())
    out = {}
    for k, stage in enumerate(stages, start=1):
        blocks = modules.get(stage)
        if not isinstance(blocks, nn.Sequential) or not len(blocks):
            return {}
        last = f"{stage}.{len(blocks) - 1}"
        act = next((a for a in ("act3", "act2") if f"{last}.{a}" in modules), None)
        bn = f"{last}.bn{act[-1]}" if act else None
        if act is None or bn not in modules:
            return {}
        out[f"stage{k}"] = (f"{last}.{act}:input", bn)
    return out


def add_taps(model: nn.Module) -> nn.Module:
    """Give timm ``model`` the zoo's canonical taps (``tap_map``), the token-to-map and
    channels-last transforms of its outputs (``tap_transforms``) and, for ResNets,
    ``bn_before_relu``."""
    info = list(getattr(model, "feature_info", None) or [])
    config = getattr(model, "pretrained_cfg", {}) or {}
    taps: dict[str, str] = {}
    stem, stages = _stage_modules(info) if info else (None, [])
    if stem:
        taps["stage0"] = stem
    taps.update({f"stage{k}": m for k, m in enumerate(stages, start=1)})
    pool = _global_pool(model)
    norm = _module_name(model, ("norm",))
    if pool and not (norm and _is_token_model(model)):
        taps["feat"] = f"{pool}:input"
    elif norm:
        taps["feat"] = norm
    elif stages:
        taps["feat"] = stages[-1]
    head = _module_name(model, _names(config, "classifier"))
    if head:
        taps["pool"] = f"{head}:input"
    pre = _preactivation(model, stages)
    for stage, (tap, _) in pre.items():
        taps[f"{stage}_pre"] = tap
    if pre and taps.get("feat") in (f"{pool}:input", stages[-1] if stages else None):
        taps["feat_pre"] = pre[f"stage{len(stages)}"][0]
    family = type(model).__name__
    if not pre and family in LINEAR_STAGE_ENDS:
        taps.update({f"stage{k}_pre": m for k, m in enumerate(stages, start=1)})
        if family in LINEAR_FEAT and "feat" in taps:
            taps["feat_pre"] = taps["feat"]
    model.tap_map = taps
    model.bn_before_relu = {stage: bn for stage, (_, bn) in pre.items()}
    model.tap_transforms = _transforms(model, taps)
    return model


def _is_token_model(model: nn.Module) -> bool:
    """Whether ``model``'s blocks output tokens (B, N, C): a ViT/DeiT (``num_prefix_tokens``)
    or an MLP-Mixer (``stem`` then ``blocks``, no stages)."""
    return (hasattr(model, "num_prefix_tokens") or
            (hasattr(model, "stem") and hasattr(model, "blocks") and not hasattr(model, "stages")
             and getattr(model, "feature_info", None) is not None
             and len({d["reduction"] for d in model.feature_info}) == 1))


def as_map(x: Any, prefix_tokens: int = 0, channels_last: bool = False) -> torch.Tensor:
    """A timm block's raw output as the image-like map methods read: the first tensor of a
    tuple (PiT's blocks return the map and the class tokens), tokens (B, N, C) on their grid
    without the ``prefix_tokens``, a channels-last map permuted to (B, C, H, W)."""
    if isinstance(x, (tuple, list)):
        x = x[0]
    if x.ndim == 3:
        return tokens_to_map(x, prefix_tokens)
    return channels_last_to_first(x) if channels_last else x


def _transforms(model: nn.Module, taps: Mapping[str, str]) -> dict[str, Callable]:
    """The function each tap's raw output passes through to become (B, C, H, W): every timm
    family's blocks may return tokens or a tuple (LeViT, EfficientFormer, PiT), not only
    ViTs'."""
    to_map = functools.partial(as_map, prefix_tokens=int(getattr(model, "num_prefix_tokens", 0)),
                               channels_last=getattr(model, "output_fmt", "NCHW") == "NHWC")
    return {tap: to_map for tap in taps if tap != "pool"}


#: What the family is, in the error for an unknown model name.
ABOUT = f"timm's models ({TIMM_EXTRA}); see them with kt-bench list models 'timm:PATTERN'"

MODELS.register_family(Family(PREFIX, _resolve, timm_names, ABOUT))
