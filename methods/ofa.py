"""``ofa``: One-for-All knowledge distillation (Hao et al., NeurIPS 2023, "One-for-All: Bridge
the Gap Between Heterogeneous Architectures in Knowledge Distillation").

Each chosen student stage gets a trainable projector branch that maps its features into the
logit space; every branch's logits, and the student's own, are pulled towards the teacher's
logits by the OFA loss, whose target ``(p_t + onehot)^eps − onehot`` enhances the target class
(eps > 1) or not (eps = 1: the teacher's soft labels). Facts from the authors' code (O =
Hao840/OFAKD):

* ``distillers/ofa.py`` ``ofa_loss``: p = softmax(z / T) for both networks; per sample
  Σ_c −((p_t + mask)^eps − mask)_c · log p_s,c with mask the one-hot label; mean over the
  batch; no T² factor. The teacher runs in eval mode without gradients.
* ``OFA.forward``: loss = gt_w · CE + kd_w · ofa_loss(student logits, eps[-1]) + ofa_w · Σ over
  the stages of ofa_loss(projector_k(stage k features), eps_k); one eps broadcasts to every
  stage and the logits (``len(eps) == len(stages) + 1`` otherwise).
* ``OFA.__init__``, CNN students: stage k < 4 gets ``4 − k`` SepConv blocks (each halving the
  map; channels doubling, the last one's out channels max(feature dim of student, of teacher)),
  stage 4 a 1x1 conv with bias to that width; then AdaptiveAvgPool2d(1), Flatten, Linear to the
  classes. The feature dims are ``stage_info(-1)``: the pre-logit (pooled) feature's width.
  ViT students: ``max(int(log2(grid / 7)), 0)`` PatchMerging layers (the first to the
  student's feature dim, with GELU; the last without activation), ``max(4 − k, 1)`` timm
  ``Block(dim, num_heads=4)``, then the class token or the mean of the tokens, and a Linear.
  ``init_weights`` (``distillers/utils.py``): convs Kaiming-normal (fan_out, relu), BN weight 1
  bias 0, Linear weights truncated normal (std 0.02) with zero bias.
* ``train.py`` defaults: ``--ofa-eps 1``, ``--ofa-stage 1 2 3 4``, ``--ofa-temperature 1``,
  ``--ofa-loss-weight 1``, ``--kd-loss-weight 1``, ``--gt-loss-weight 1``. O's README trains its
  ImageNet ResNet-18 student with ``--ofa-eps 1.5``. O's CIFAR configs
  (``configs/cifar/cnn.yaml``, ``vit_mlp.yaml``) train CE with label smoothing 0.1, which
  kt-bench's cross-entropy does not do.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from kt_bench.methods.dkd import target_mask
from kt_bench.methods.sp import at_least_float32
from torch import nn

from kt_bench.api.method import (
    Batch,
    Method,
    Needs,
    NotApplicable,
    Shapes,
    Taps,
    register_method,
)
from kt_bench.core.errors import KtBenchError

#: The projector branches: O's CNN branch (SepConv blocks) and its ViT branch (patch merging
#: and transformer blocks on the map's tokens).
BRANCHES = ("conv", "tokens")
#: The token grid O's ViT branch merges down to (``final_patch_grid``: 49 patches).
FINAL_TOKEN_GRID = 7
#: The heads of O's transformer blocks in the ViT branch.
TOKEN_HEADS = 4
#: The tap whose width is a network's feature dim (O's ``stage_info(-1)``).
POOL = "pool"
_STAGE = re.compile(r"stage(\d+)")


def ofa_loss(logits_s: torch.Tensor, logits_t: torch.Tensor, mask: torch.Tensor, eps: float,
             temperature: float = 1.0) -> torch.Tensor:
    """Mean over the batch of Σ_c −((p_t + mask)^eps − mask)_c · log p_s,c, with p =
    softmax(logits / temperature) and ``mask`` the (B, C) one-hot labels (O's ``ofa_loss``).

    log p_s is ``log_softmax``: the same value as O's log(softmax), without its −inf where a
    probability underflows. In float32 (float64 stays); the teacher's logits are detached.
    """
    z_s = at_least_float32(logits_s)
    z_t = logits_t.detach().to(z_s.dtype)
    mask = mask.to(z_s.dtype)
    log_p_s = F.log_softmax(z_s / temperature, dim=1)
    p_t = F.softmax(z_t / temperature, dim=1)
    target = (p_t + mask).pow(eps) - mask
    return -(target * log_p_s).sum(dim=1).mean()


# ---- the CNN branch ----------------------------------------------------------------------------

class SepConv(nn.Module):
    """O's ``SepConv``: depthwise 3x3 (stride 2) and pointwise convs, BN, ReLU, then depthwise
    3x3 and pointwise to ``c_out``, BN, ReLU; halves the map (state-dict keys ``op.<i>.*`` as
    O's)."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.op = nn.Sequential(
            nn.Conv2d(c_in, c_in, 3, stride=2, padding=1, groups=c_in, bias=False),
            nn.Conv2d(c_in, c_in, 1, bias=False),
            nn.BatchNorm2d(c_in),
            nn.ReLU(),
            nn.Conv2d(c_in, c_in, 3, stride=1, padding=1, groups=c_in, bias=False),
            nn.Conv2d(c_in, c_out, 1, bias=False),
            nn.BatchNorm2d(c_out),
            nn.ReLU(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The block's output: (B, c_out, ⌈H/2⌉, ⌈W/2⌉)."""
        return self.op(x)


def conv_projector(channels: int, downsamplings: int, width: int, num_classes: int
                   ) -> nn.Sequential:
    """O's CNN branch for a map of ``channels``: ``downsamplings`` SepConv blocks (channels
    doubling, the last one's out channels ``width``), or a 1x1 conv with bias to ``width``
    where there are none; then global average pooling and a Linear to ``num_classes``."""
    if downsamplings:
        blocks = []
        c = channels
        for i in range(downsamplings):
            blocks.append(SepConv(c, width if i == downsamplings - 1 else 2 * c))
            c *= 2
    else:
        blocks = [nn.Conv2d(channels, width, 1)]
    return nn.Sequential(*blocks, nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Linear(width, num_classes))


# ---- the token branch --------------------------------------------------------------------------

class MapTokens(nn.Module):
    """(B, C, H, W) -> (B, H·W, C): the map's positions as tokens, row by row (the order of a
    ViT's patch tokens)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The tokens of map ``x``."""
        return x.flatten(2).transpose(1, 2)


class PatchMerging(nn.Module):
    """O's ``PatchMerging``: each 2x2 group of tokens of an ``resolution`` grid concatenated
    (order (0,0), (1,0), (0,1), (1,1)), LayerNorm over the 4·dim features, a Linear without
    bias to ``out_dim``, then ``act`` (GELU or none)."""

    def __init__(self, resolution: tuple[int, int], dim: int, out_dim: int,
                 act: bool) -> None:
        super().__init__()
        self.resolution = resolution
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, out_dim, bias=False)
        self.act = nn.GELU() if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, H·W, dim) -> (B, H/2·W/2, out_dim)."""
        h, w = self.resolution
        b, n, c = x.shape
        if n != h * w:
            raise ValueError(f"PatchMerging expects {h}x{w} = {h * w} tokens, got {n}")
        x = x.reshape(b, h, w, c)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]],
                      dim=-1)
        return self.act(self.reduction(self.norm(x.reshape(b, -1, 4 * c))))


class TokenMean(nn.Module):
    """(B, N, D) -> (B, D): the mean of the tokens (O's ``GAP1d``)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The tokens' mean."""
        return x.mean(1)


def timm_block() -> type[nn.Module]:
    """timm's ``Block`` (the transformer block of its vision transformers); a ValueError naming
    the extra to install where timm is missing."""
    try:
        from timm.models.vision_transformer import Block
    except ImportError:
        raise ValueError("branch 'tokens' needs timm: pip install 'kt-bench[timm]'") from None
    return Block


def token_merges(grid: int) -> int:
    """How many patch mergings O's ViT branch applies to a ``grid`` x ``grid`` token map:
    max(int(log2(grid / 7)), 0)."""
    return max(int(math.log2(grid / FINAL_TOKEN_GRID)), 0)


def token_projector(channels: int, grid: int, blocks: int, width: int, num_classes: int
                    ) -> nn.Sequential:
    """O's ViT branch on the tokens of a ``grid`` x ``grid`` map of ``channels``:
    :func:`token_merges` PatchMerging layers (the first ``channels`` -> ``width`` with GELU,
    the others ``width`` -> ``width``, the last without activation), ``blocks`` timm blocks of
    ``width`` with 4 heads (LayerNorm eps 1e-5, timm 0.6.5's default), the mean of the tokens
    and a Linear to ``num_classes``.

    The map has no class token (kt-bench's taps drop it), so O's class-token read-out never
    applies. Where no merging is needed and ``channels`` is not ``width`` (O's ViTs never have
    that: their tokens are as wide as their feature), a Linear without bias makes the tokens
    ``width`` wide first."""
    block = timm_block()
    merges = token_merges(grid)
    layers: list[nn.Module] = [MapTokens()]
    if not merges and channels != width:
        layers.append(nn.Linear(channels, width, bias=False))
    mergers = [PatchMerging((grid >> i, grid >> i), channels if i == 0 else width, width,
                            act=i == 0 or i != merges - 1)
               for i in range(merges)]
    layers.append(nn.Sequential(*mergers))
    # nn.LayerNorm (eps 1e-5): the Block default of timm 0.6.5, which O ran (timm >= 0.9
    # defaults to eps 1e-6)
    layers.append(nn.Sequential(*(block(dim=width, num_heads=TOKEN_HEADS, norm_layer=nn.LayerNorm)
                                  for _ in range(blocks))))
    layers += [TokenMean(), nn.Linear(width, num_classes)]
    return nn.Sequential(*layers)


def init_projector(module: nn.Module) -> None:
    """O's ``init_weights`` on every layer of ``module``: convs Kaiming-normal (fan_out, relu),
    BatchNorm weight 1 and bias 0, Linear weights truncated normal (std 0.02, cut at ±2) and
    zero bias; other layers keep PyTorch's."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


# ---- the plugin --------------------------------------------------------------------------------

def stage_number(tap: str) -> int:
    """k of a tap named ``stage<k>``; a ValueError for any other name."""
    match = _STAGE.fullmatch(tap) if isinstance(tap, str) else None
    if match is None:
        raise ValueError(f"stages must name taps stage<k> (stage1, stage2, ...), got {tap!r}")
    return int(match.group(1))


def _check_positive(value: float, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) \
            or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
    return float(value)


@register_method("ofa")
class OFA(Method):
    """OFA-KD: a projector per student stage into the logit space; the OFA loss of every
    projector's logits and of the student's own against the teacher's logits and the labels.

    Terms: ``ofa_stages`` (Σ over ``stages``, weighted by ``weight``: O's ``--ofa-loss-weight``)
    and ``ofa_logits`` (the student's logits, weighted by ``logit_weight``: O's
    ``--kd-loss-weight``); the cross-entropy is the recipe's (O's ``--gt-loss-weight`` 1).
    Defaults are O's ``train.py``: ``eps`` 1 (one number for every stage and the logits, or
    ``len(stages) + 1`` numbers, the logits' last), ``temperature`` 1, both weights 1; but
    ``stages`` stage1..3, the stages every model of the zoo has (O's default stage1..4 is that
    of its 4-stage ImageNet models: set ``stages = ["stage1", ..., "stage4"]`` for 4-stage
    students, as grids set ``layers`` for VGG in other methods).

    ``branch`` chooses the projector: ``"conv"`` (O's CNN branch) or ``"tokens"`` (O's ViT
    branch on the map's positions as tokens; needs timm). kt-bench picks the branch by this
    option, not by detecting the student's architecture (its taps are (B, C, H, W) maps for
    every architecture). Stage ``stage<k>`` gets ``last_stage − k`` SepConv blocks (a 1x1 conv
    where that is 0) or ``max(last_stage − k, 1)`` transformer blocks: O's ``4 − k`` with
    ``last_stage`` the number of the student's last stage; None: the highest ``k`` in
    ``stages`` (3 for the default, 4 for O's stage1..4; set it where ``stages`` leaves out
    the student's last stage). The projectors'
    width is max(student, teacher) pooled-feature width (``conv``) or the student's
    (``tokens``); they train with the student.
    """

    default_weight = 1.0

    def __init__(
        self,
        weight: float | None = None,
        stages: tuple[str, ...] = ("stage1", "stage2", "stage3"),
        eps: float | tuple[float, ...] = 1.0,
        temperature: float = 1.0,
        logit_weight: float = 1.0,
        branch: str = "conv",
        last_stage: int | None = None,
    ) -> None:
        super().__init__(weight)
        if isinstance(stages, str):
            raise ValueError(f"stages must be a list of tap names, got the string '{stages}'")
        self.stages = tuple(stages)
        if not self.stages:
            raise ValueError("stages must name at least one tap (stage1, stage2, ...)")
        if len(set(self.stages)) != len(self.stages):
            raise ValueError(f"stages names a tap twice: {list(self.stages)}")
        numbers = [stage_number(s) for s in self.stages]
        if last_stage is None:
            last_stage = max(numbers)
        if isinstance(last_stage, bool) or not isinstance(last_stage, int) \
                or last_stage < max(numbers):
            raise ValueError(f"last_stage must be an integer >= the highest stage in stages "
                             f"({max(numbers)}) or None, got {last_stage!r}")
        self.last_stage = int(last_stage)
        values = [eps] if isinstance(eps, (int, float)) else list(eps)
        if len(values) == 1:
            values = values * (len(self.stages) + 1)
        if len(values) != len(self.stages) + 1:
            raise ValueError(f"eps must be one number or {len(self.stages) + 1} (one per stage, "
                             f"then the logits'), got {len(values)}")
        self.eps = tuple(_check_positive(e, "eps") for e in values)
        self.temperature = _check_positive(temperature, "temperature")
        if isinstance(logit_weight, bool) or not isinstance(logit_weight, (int, float)) \
                or not math.isfinite(logit_weight) or logit_weight < 0:
            raise ValueError(f"logit_weight must be a finite number >= 0, got {logit_weight!r}")
        self.logit_weight = float(logit_weight)
        if branch not in BRANCHES:
            raise ValueError(f"branch must be one of {', '.join(BRANCHES)}, got {branch!r}")
        self.branch = branch
        if branch == "tokens":
            timm_block()  # a missing timm is the grid's error, not the cells'
        self.needs = Needs(taps=(*self.stages, POOL, "logits"), labels=True)
        self.projectors = nn.ModuleDict()

    def downsamplings(self, stage: str) -> int:
        """The SepConv blocks of ``stage``'s conv branch (O's ``4 − k``)."""
        return self.last_stage - stage_number(stage)

    def token_blocks(self, stage: str) -> int:
        """The transformer blocks of ``stage``'s token branch (O's ``max(4 − k, 1)``)."""
        return max(self.last_stage - stage_number(stage), 1)

    def setup(self, student_shapes: Shapes, teacher_shapes: Shapes) -> None:
        """One projector per stage from the taps' shapes: the classes from the student's
        logits, the widths from both networks' pooled features."""
        num_classes = int(student_shapes["logits"][1])
        width_s, width_t = int(student_shapes[POOL][1]), int(teacher_shapes[POOL][1])
        projectors = {}
        for stage in self.stages:
            shape = tuple(student_shapes[stage])
            if len(shape) != 4:
                raise KtBenchError(f"method 'ofa' needs (B, C, H, W) maps; the student's "
                                   f"{stage} has shape {shape}")
            c, h, w = shape[1:]
            if self.branch == "conv":
                projectors[stage] = conv_projector(c, self.downsamplings(stage),
                                                   max(width_s, width_t), num_classes)
            else:
                self._check_token_map(stage, h, w, width_s)
                projectors[stage] = token_projector(c, h, self.token_blocks(stage), width_s,
                                                    num_classes)
        self.projectors = nn.ModuleDict(projectors)
        init_projector(self.projectors)

    @staticmethod
    def _check_token_map(stage: str, h: int, w: int, width: int) -> None:
        """NotApplicable where O's ViT branch cannot take the student's ``stage`` map."""
        if h != w:
            raise NotApplicable(f"ofa branch 'tokens' needs square maps; the student's {stage} "
                                f"is {h}x{w}")
        grid = h
        for _ in range(token_merges(h)):
            if grid % 2:
                raise NotApplicable(f"ofa branch 'tokens' merges the student's {stage} "
                                    f"({h}x{w}) in 2x2 groups, which an odd grid of {grid} "
                                    f"does not allow")
            grid //= 2
        if width % TOKEN_HEADS:
            raise NotApplicable(f"ofa branch 'tokens' splits the student's feature width "
                                f"{width} over {TOKEN_HEADS} heads; it is no multiple of "
                                f"{TOKEN_HEADS}")

    def loss_terms(self, student: Taps, teacher: Taps, batch: Batch) -> dict[str, torch.Tensor]:
        """``ofa_stages``: Σ over the stages of the OFA loss of the stage's projected logits;
        ``ofa_logits``: the OFA loss of the student's logits (both on the batch's labels)."""
        assert len(self.projectors) == len(self.stages), "setup() builds the projectors"
        logits_t = teacher["logits"]
        mask = target_mask(student["logits"], batch.labels)
        stage_terms = [ofa_loss(self.projectors[s](student[s]), logits_t, mask, e,
                                self.temperature)
                       for s, e in zip(self.stages, self.eps, strict=False)]
        return {"ofa_stages": sum(stage_terms),
                "ofa_logits": ofa_loss(student["logits"], logits_t, mask, self.eps[-1],
                                       self.temperature)}

    def term_weights(self, epoch: int, epochs: int) -> dict[str, float]:
        """``weight`` on ``ofa_stages``, ``logit_weight`` on ``ofa_logits``, every epoch."""
        return {"ofa_stages": self.weight, "ofa_logits": self.logit_weight}
