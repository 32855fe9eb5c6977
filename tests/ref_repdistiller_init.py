"""An independent re-statement of RepDistiller's two-stage methods AB, FT and FSP: their losses,
their modules, the initialisation stage and the main stage's loss, for cross-checks of
kt-bench's ``ab``, ``ft`` and ``fsp`` cells.

Written from RepDistiller's code (R = HobbitLong/RepDistiller), not from kt-bench's plugins
(nothing here imports methods/ab.py, methods/ft.py or methods/fsp.py). Facts and their R paths:

* Feature lists, R:models/resnet.py, wrn.py, vgg.py ``forward(x, is_feat=True, preact=...)``:
  ``preact=False`` as tests/repdistiller_ref.py re-states it; ``preact=True`` replaces f1..f3
  (VGG f1..f4) by: ResNet, each stage's last residual sum before its final ReLU; WRN,
  ``block2.layer[0].bn1(f1)``, ``block3.layer[0].bn1(f2)``, ``bn1(f3)`` (the BNs called a
  second time, after the forward: in train mode their running statistics move twice); VGG,
  each block's output before the ReLU that R's forward applies. f0 and the pooled entry are
  unchanged.
* ``get_feat_modules()``: ResNet ``[conv1, bn1, relu, layer1, layer2, layer3]``; WRN
  ``[conv1, block1, block2, block3]`` (not the final BN, not fc); VGG ``[block0, pool0, ...,
  block4, pool4]`` (not the classifier).
* AB, R:distiller_zoo/AB.py ``ABLoss(feat_num, margin=1.0)``: ``w = [2**(i-feat_num+1)]``;
  per stage ``criterion_alternative_l2(s, t) = |(s+m)²·[(s > −m) & (t <= 0)] +
  (s−m)²·[(s <= m) & (t > 0)]|.sum()``, times w_i, divided by the batch size, times 3/1000;
  the forward returns the list. R:models/util.py ``Connector(s_shapes, t_shapes)``: per stage
  ``nn.Sequential()`` when channels and height agree, else ``ConvReg(s, t, use_relu=False)``
  (conv with bias: 3x3 stride 2 pad 1 when s_H = 2 t_H, 4x4 stride-2 transposed pad 1 when
  half, else a (1+s_H−t_H)x(1+s_W−t_W) conv; then BN).
* FT, R:models/util.py ``Paraphraser(t_shape, k=0.5, use_bn=False)``: encoder conv3x3
  C→C, C→int(C·k), int(C·k)→int(C·k); decoder ConvTranspose3x3 F→F, F→C, C→C; stride 1,
  padding 1, bias; ``nn.Sequential()`` where BN would be; LeakyReLU(0.1) after each;
  ``forward(x, is_factor)`` returns the encoder's output if ``is_factor`` else (factor,
  decoder(factor)). ``Translator(s_shape, t_shape, k=0.5, use_bn=True)``: encoder conv3x3
  C_s→C_s, C_s→int(C_t·k), →int(C_t·k), each with BN and LeakyReLU(0.1).
  R:distiller_zoo/FT.py ``FactorTransfer(p1=2, p2=1)``: the larger map adaptive-avg-pooled to
  (h, h) of the smaller; ``factor(f) = F.normalize(f.pow(2).mean(1).view(B, -1))``; loss
  ``(factor(f_s) − factor(f_t)).abs().mean()``.
* FSP, R:distiller_zoo/FSP.py: ``FSP(s_shapes, t_shapes)`` raises ValueError unless the
  channel counts agree; ``compute_fsp(g)`` for consecutive (bot, top): the taller pooled to
  (h, h) of the other, ``fsp = (bot.unsqueeze(1) * top.unsqueeze(2)).mean(-1)`` over
  positions (shape (B, C_top, C_bot)); loss per pair ``(s − t).pow(2).mean()``; the forward
  returns the list.
* Initialisation stage, R:helper/pretrain.py ``init``: ``model_t.eval(); model_s.eval();
  init_modules.train()``; SGD over ``init_modules.parameters()`` with lr 0.01 when
  ``model_s`` is a CIFAR ResNet or WRN and the method is ``factor``, else
  ``opt.learning_rate``; momentum and weight decay of the options. Per batch: features with
  ``preact = (distill == 'abound')``, the teacher's under ``no_grad`` and detached;
  ``abound``: ``sum(ABLoss(connector(feat_s[1:-1]), feat_t[1:-1]))``; ``factor``:
  ``MSELoss(paraphraser(feat_t[-2])[1], feat_t[-2])``; ``fsp``: ``sum(FSP(feat_s[:-1],
  feat_t[:-1]))``. No cross-entropy, no beta.
* R:train_student.py: init modules: ``abound`` [connector, model_s.get_feat_modules()];
  ``factor`` [paraphraser]; ``fsp`` [model_s.get_feat_modules()]. The main stage's
  ``trainable_list``: the student, plus the translator for ``factor`` (connector and
  paraphraser are in ``module_list`` only: not optimised). ``--init_epochs`` 30,
  ``--learning_rate`` 0.05 (0.01 for MobileNetV2 and ShuffleNet students).
* Main stage, R:helper/loops.py ``train_distill``: every module of ``module_list`` in train
  mode, then the teacher, the connector (``abound``) and the paraphraser (``factor``) in eval
  mode; ``preact`` only for ``abound``; ``loss_kd = 0`` for ``abound`` and ``fsp``; ``factor``:
  ``FactorTransfer(translator(feat_s[-2]), paraphraser(feat_t[-2], is_factor=True))``;
  ``loss = gamma·CE + alpha·KD(T=4) + beta·loss_kd``.
* Flags, R:scripts/run_cifar_distill.sh: ``abound -a 0 -b 1``, ``factor -a 0 -b 200``, ``fsp
  -a 0 -b 50``; ``-r`` (gamma) defaults to 1.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kt_bench.models.cifar_resnet import CifarResNet
from kt_bench.models.vgg import VGG
from kt_bench.models.wrn import WideResNet

from .repdistiller_ref import R_KD_T, r_kd, repdistiller_feats

#: (gamma, alpha, beta) of R:scripts/run_cifar_distill.sh per R ``--distill`` name.
R_FLAGS_INIT: dict[str, tuple[float, float, float]] = {
    "abound": (1.0, 0.0, 1.0),
    "factor": (1.0, 0.0, 200.0),
    "fsp": (1.0, 0.0, 50.0),
}

#: R:train_student.py defaults.
R_INIT_EPOCHS = 30
R_LEARNING_RATE = 0.05
R_MOMENTUM = 0.9
R_WEIGHT_DECAY = 5e-4

#: R:helper/pretrain.py: students whose FT initialisation runs at lr 0.01.
R_FACTOR_LR_001_STUDENTS = ("resnet8", "resnet14", "resnet20", "resnet32", "resnet44",
                            "resnet56", "resnet110", "resnet8x4", "resnet32x4", "wrn_16_1",
                            "wrn_16_2", "wrn_40_1", "wrn_40_2")

#: R:train_student.py: students trained at lr 0.01 instead of 0.05.
R_LOW_LR_STUDENTS = ("mobile_half", "mobile_full", "ShuffleV1", "ShuffleV2")


def r_learning_rate(model_s: str) -> float:
    """R's ``opt.learning_rate`` for student ``model_s`` (R's model names)."""
    return 0.01 if model_s in R_LOW_LR_STUDENTS else R_LEARNING_RATE


def r_init_lr(model_s: str, distill: str) -> float:
    """R:helper/pretrain.py's initialisation learning rate."""
    if model_s in R_FACTOR_LR_001_STUDENTS and distill == "factor":
        return 0.01
    return r_learning_rate(model_s)


# --------------------------------------------------------------------------------------------
# Feature lists with preact=True, and the feature modules
# --------------------------------------------------------------------------------------------

def _resnet_block_with_pre(block: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """R's BasicBlock: (ReLU(sum), sum) with sum = BN(conv(ReLU(BN(conv x)))) + residual."""
    out = F.relu(block.bn1(block.conv1(x)))
    out = block.bn2(block.conv2(out))
    projects = block.conv1.stride != (1, 1) or block.conv1.in_channels != block.conv1.out_channels
    residual = block.shortcut[1](block.shortcut[0](x)) if projects else x
    pre = out + residual
    return F.relu(pre), pre


def _resnet_preact(model: CifarResNet, x: Tensor) -> tuple[list[Tensor], Tensor]:
    """One pass: [f0, f1_pre, f2_pre, f3_pre, pooled] and the logits."""
    h = F.relu(model.bn1(model.conv1(x)))
    feats = [h]
    for layer in (model.layer1, model.layer2, model.layer3):
        for block in layer:
            h, pre = _resnet_block_with_pre(block, h)
        feats.append(pre)
    pooled = F.avg_pool2d(h, 8).flatten(1)  # R's AvgPool2d(8): global at 32x32 inputs
    return [*feats, pooled], model.fc(pooled)


def _vgg_preact(model: VGG, x: Tensor) -> tuple[list[Tensor], Tensor]:
    """One pass: [f0, f1_pre, ..., f4_pre, pooled] (f0 after its ReLU) and the logits."""
    h = x
    feats = []
    for i, block in enumerate((model.block0, model.block1, model.block2, model.block3,
                               model.block4)):
        if i in (1, 2, 3):  # R's pool0..pool2 (pool3 runs for 64x64 inputs only)
            h = F.max_pool2d(h, kernel_size=2, stride=2)
        layers = list(block)
        for j in range(0, len(layers), 3):
            pre = layers[j + 1](layers[j](h))
            h = F.relu(pre)
        feats.append(h if i == 0 else pre)
    pooled = F.adaptive_avg_pool2d(h, 1).flatten(1)
    return [*feats, pooled], model.classifier(pooled)


def repdistiller_preact_feats(model: nn.Module, x: Tensor) -> tuple[list[Tensor], Tensor]:
    """R's ``model(x, is_feat=True, preact=True)`` on a kt-bench model object (one forward
    pass, as R's; WRN's pre-activation BNs are called again afterwards, as R calls them)."""
    if isinstance(model, CifarResNet):
        return _resnet_preact(model, x)
    if isinstance(model, VGG):
        return _vgg_preact(model, x)
    if isinstance(model, WideResNet):
        feats, logits = repdistiller_feats(model, x)
        pres = [model.block2[0].bn1(feats[1]), model.block3[0].bn1(feats[2]), model.bn(feats[3])]
        return [feats[0], *pres, feats[-1]], logits
    raise TypeError(f"no RepDistiller preact list for {type(model).__name__}")


def r_feat_modules(model: nn.Module) -> nn.ModuleList:
    """R's ``model.get_feat_modules()`` on a kt-bench model object."""
    if isinstance(model, CifarResNet):
        parts = [model.conv1, model.bn1, model.relu, model.layer1, model.layer2, model.layer3]
    elif isinstance(model, WideResNet):
        parts = [model.conv1, model.block1, model.block2, model.block3]
    elif isinstance(model, VGG):
        parts = [model.block0, model.down[0], model.block1, model.down[1], model.block2,
                 model.down[2], model.block3, model.block4, model.pool]
    else:
        raise TypeError(f"no RepDistiller feature modules for {type(model).__name__}")
    return nn.ModuleList(parts)


# --------------------------------------------------------------------------------------------
# R's modules
# --------------------------------------------------------------------------------------------

class RConvReg(nn.Module):
    """R's ``ConvReg(s_shape, t_shape, use_relu)``: attributes ``conv``, ``bn``, ``relu``."""

    def __init__(self, s_shape: Sequence[int], t_shape: Sequence[int], use_relu: bool = True):
        super().__init__()
        _, s_c, s_h, s_w = (int(v) for v in s_shape)
        _, t_c, t_h, t_w = (int(v) for v in t_shape)
        self.use_relu = use_relu
        if s_h == 2 * t_h:
            self.conv = nn.Conv2d(s_c, t_c, kernel_size=3, stride=2, padding=1)
        elif s_h * 2 == t_h:
            self.conv = nn.ConvTranspose2d(s_c, t_c, kernel_size=4, stride=2, padding=1)
        elif s_h >= t_h:
            self.conv = nn.Conv2d(s_c, t_c, kernel_size=(1 + s_h - t_h, 1 + s_w - t_w))
        else:
            raise ValueError(f"student size {s_h}, teacher size {t_h}")
        self.bn = nn.BatchNorm2d(t_c)
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        """conv, BN, and ReLU if ``use_relu``."""
        x = self.bn(self.conv(x))
        return self.relu(x) if self.use_relu else x


class RConnector(nn.Module):
    """R's ``Connector(s_shapes, t_shapes)``: ``connectors`` (a ModuleList)."""

    def __init__(self, s_shapes: Sequence[Sequence[int]], t_shapes: Sequence[Sequence[int]]):
        super().__init__()
        assert len(s_shapes) == len(t_shapes), "unequal length of feat list"
        self.connectors = nn.ModuleList(
            nn.Sequential() if (s[1] == t[1] and s[2] == t[2]) else RConvReg(s, t, False)
            for s, t in zip(s_shapes, t_shapes, strict=True))

    def forward(self, g_s: Sequence[Tensor]) -> list[Tensor]:
        """Each map through its connector."""
        return [c(g) for c, g in zip(self.connectors, g_s, strict=True)]


class RABLoss(nn.Module):
    """R's ``ABLoss(feat_num, margin)``: the list of weighted, normalised stage losses."""

    def __init__(self, feat_num: int, margin: float = 1.0) -> None:
        super().__init__()
        self.w = [2 ** (i - feat_num + 1) for i in range(feat_num)]
        self.margin = margin

    def criterion_alternative_l2(self, source: Tensor, target: Tensor) -> Tensor:
        """R's per-stage sum (see the module docstring)."""
        m = self.margin
        loss = ((source + m) ** 2 * ((source > -m) & (target <= 0)).float()
                + (source - m) ** 2 * ((source <= m) & (target > 0)).float())
        return torch.abs(loss).sum()

    def forward(self, g_s: Sequence[Tensor], g_t: Sequence[Tensor]) -> list[Tensor]:
        """Per stage: w_i · criterion / bsz / 1000 · 3."""
        bsz = g_s[0].shape[0]
        losses = [self.criterion_alternative_l2(s, t) for s, t in zip(g_s, g_t, strict=False)]
        return [w * loss / bsz / 1000 * 3 for w, loss in zip(self.w, losses, strict=False)]


def _r_conv_stack(widths, transposed: bool, use_bn: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for c_in, c_out in widths:
        conv = (nn.ConvTranspose2d if transposed else nn.Conv2d)(c_in, c_out, 3, 1, 1)
        layers += [conv, nn.BatchNorm2d(c_out) if use_bn else nn.Sequential(),
                   nn.LeakyReLU(0.1)]
    return nn.Sequential(*layers)


class RParaphraser(nn.Module):
    """R's ``Paraphraser(t_shape, k, use_bn=False)``."""

    def __init__(self, t_shape: Sequence[int], k: float = 0.5) -> None:
        super().__init__()
        c = int(t_shape[1])
        f = int(c * k)
        self.encoder = _r_conv_stack([(c, c), (c, f), (f, f)], False, False)
        self.decoder = _r_conv_stack([(f, f), (f, c), (c, c)], True, False)

    def forward(self, x: Tensor, is_factor: bool = False):
        """The factor, or (factor, reconstruction)."""
        factor = self.encoder(x)
        return factor if is_factor else (factor, self.decoder(factor))


class RTranslator(nn.Module):
    """R's ``Translator(s_shape, t_shape, k, use_bn=True)``."""

    def __init__(self, s_shape: Sequence[int], t_shape: Sequence[int], k: float = 0.5) -> None:
        super().__init__()
        c_s, f = int(s_shape[1]), int(int(t_shape[1]) * k)
        self.encoder = _r_conv_stack([(c_s, c_s), (c_s, f), (f, f)], False, True)

    def forward(self, x: Tensor) -> Tensor:
        """The student's factor."""
        return self.encoder(x)


def _r_pool_taller(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """R's alignment: the map of larger height adaptive-avg-pooled to (h, h) of the other."""
    h_a, h_b = a.shape[2], b.shape[2]
    if h_a > h_b:
        a = F.adaptive_avg_pool2d(a, (h_b, h_b))
    elif h_a < h_b:
        b = F.adaptive_avg_pool2d(b, (h_a, h_a))
    return a, b


def r_factor_transfer(f_s: Tensor, f_t: Tensor) -> Tensor:
    """R's ``FactorTransfer()(f_s, f_t)`` (p1 = 2, p2 = 1)."""
    f_s, f_t = _r_pool_taller(f_s, f_t)

    def factor(f: Tensor) -> Tensor:
        return F.normalize(f.pow(2).mean(1).view(f.size(0), -1))

    return (factor(f_s) - factor(f_t)).abs().mean()


def r_compute_fsp(g: Sequence[Tensor]) -> list[Tensor]:
    """R's ``FSP.compute_fsp``: (B, C_top, C_bot) per consecutive pair."""
    out = []
    for i in range(len(g) - 1):
        bot, top = _r_pool_taller(g[i], g[i + 1])
        bot = bot.unsqueeze(1)
        top = top.unsqueeze(2)
        bot = bot.view(bot.shape[0], bot.shape[1], bot.shape[2], -1)
        top = top.view(top.shape[0], top.shape[1], top.shape[2], -1)
        out.append((bot * top).mean(-1))
    return out


def r_fsp(g_s: Sequence[Tensor], g_t: Sequence[Tensor]) -> list[Tensor]:
    """R's ``FSP(s_shapes, t_shapes)(g_s, g_t)``, its channel check included (ValueError)."""
    assert len(g_s) == len(g_t), "unequal length of feat list"
    if any(s.shape[1] != t.shape[1] for s, t in zip(g_s, g_t, strict=True)):
        raise ValueError("num of channels not equal (error in FSP)")
    pairs = zip(r_compute_fsp(g_s), r_compute_fsp(g_t), strict=True)
    return [(s - t).pow(2).mean() for s, t in pairs]


def make_r_modules(distill: str, student: nn.Module, teacher: nn.Module,
                   x: Tensor) -> nn.ModuleDict:
    """R:train_student.py's modules for ``distill`` from the feature shapes on ``x`` (both
    models in eval mode, ``preact=False`` as R probes them): ``connector`` (abound),
    ``paraphraser`` and ``translator`` (factor), none (fsp)."""
    modes = [(m, m.training) for m in (student, teacher)]
    student.eval()
    teacher.eval()
    with torch.no_grad():
        feat_s, _ = repdistiller_feats(student, x)
        feat_t, _ = repdistiller_feats(teacher, x)
    for m, was in modes:
        m.train(was)
    if distill == "abound":
        return nn.ModuleDict({"connector": RConnector([f.shape for f in feat_s[1:-1]],
                                                      [f.shape for f in feat_t[1:-1]])})
    if distill == "factor":
        return nn.ModuleDict({"paraphraser": RParaphraser(feat_t[-2].shape),
                              "translator": RTranslator(feat_s[-2].shape, feat_t[-2].shape)})
    if distill == "fsp":
        return nn.ModuleDict()
    raise ValueError(f"unknown distill {distill!r}")


# --------------------------------------------------------------------------------------------
# R's two stages
# --------------------------------------------------------------------------------------------

def r_init_modules(distill: str, student: nn.Module, modules: nn.ModuleDict) -> nn.ModuleList:
    """R:train_student.py's ``init_trainable_list``."""
    if distill == "abound":
        return nn.ModuleList([modules["connector"], r_feat_modules(student)])
    if distill == "factor":
        return nn.ModuleList([modules["paraphraser"]])
    return nn.ModuleList([r_feat_modules(student)])


def r_trainable_modules(distill: str, student: nn.Module,
                        modules: nn.ModuleDict) -> nn.ModuleList:
    """R:train_student.py's ``trainable_list`` of the main stage."""
    if distill == "factor":
        return nn.ModuleList([student, modules["translator"]])
    return nn.ModuleList([student])


def r_sgd(params, lr: float) -> torch.optim.SGD:
    """R's SGD with its momentum and weight decay."""
    return torch.optim.SGD(params, lr=lr, momentum=R_MOMENTUM, weight_decay=R_WEIGHT_DECAY)


def repdistiller_init_loss(distill: str, student: nn.Module, teacher: nn.Module, x: Tensor,
                           modules: nn.ModuleDict) -> Tensor:
    """R:helper/pretrain.py's loss on one batch, with the modes it sets (left set, as R
    leaves them for its optimiser's step)."""
    teacher.eval()
    student.eval()
    r_init_modules(distill, student, modules).train()
    feats = repdistiller_preact_feats if distill == "abound" else repdistiller_feats
    feat_s, _ = feats(student, x)
    with torch.no_grad():
        feat_t, _ = feats(teacher, x)
        feat_t = [f.detach() for f in feat_t]
    if distill == "abound":
        g_s = modules["connector"](feat_s[1:-1])
        return sum(RABLoss(len(feat_s[1:-1]))(g_s, feat_t[1:-1]))
    if distill == "factor":
        _, rec = modules["paraphraser"](feat_t[-2])
        return F.mse_loss(rec, feat_t[-2])
    return sum(r_fsp(feat_s[:-1], feat_t[:-1]))


def repdistiller_main_loss(distill: str, student: nn.Module, teacher: nn.Module, x: Tensor,
                           y: Tensor, modules: nn.ModuleDict) -> Tensor:
    """R:helper/loops.py ``train_distill``'s loss on one batch, with the modes it sets."""
    gamma, alpha, beta = R_FLAGS_INIT[distill]
    student.train()
    modules.train()
    teacher.eval()
    if distill == "abound":
        modules["connector"].eval()
    elif distill == "factor":
        modules["paraphraser"].eval()
    feats = repdistiller_preact_feats if distill == "abound" else repdistiller_feats
    feat_s, logit_s = feats(student, x)
    with torch.no_grad():
        feat_t, logit_t = feats(teacher, x)
        feat_t = [f.detach() for f in feat_t]
    loss_kd: Tensor | float = 0
    if distill == "factor":
        factor_s = modules["translator"](feat_s[-2])
        factor_t = modules["paraphraser"](feat_t[-2], is_factor=True)
        loss_kd = r_factor_transfer(factor_s, factor_t)
    return (gamma * F.cross_entropy(logit_s, y) + alpha * r_kd(logit_s, logit_t, R_KD_T)
            + beta * loss_kd)
