"""What the tests of ``reviewkd`` and ``ofd`` share: mdistiller's per-pair configuration as
the grid states it, central differences of loop-level formulas, combinations, and one engine
step's loss (through the lifecycle) beside an independent re-statement of mdistiller's
``forward_train`` (tests/ref_mdistiller_features.py)."""

from __future__ import annotations

import torch
from torch import nn

from kt_bench.api.method import Method, build_method, method_config
from kt_bench.models import build_model
from kt_bench.training.lifecycle import Trainee, total_loss

from .composition import gen, main_plan, one_step, prepare, read_teacher, reference_models

STAGES3 = ["stage1", "stage2", "stage3"]
VGG_LAYERS = ["stage1", "stage2", "stage3", "stage4"]
#: The grid options that reproduce M's configuration (VGG pairs override ``layers``).
GRID_OPTIONS = {
    "reviewkd": {"weight": 5.0, "warmup": 20, "layers": STAGES3, "stu_preact": False,
                 "max_mid_channel": 512},
    "ofd": {"weight": 0.001, "kernel_size": 1, "layers": STAGES3},
}
PAIRS = [("resnet56", "resnet20"), ("wrn_40_2", "wrn_16_2"), ("vgg13", "vgg8")]
CRD_PAIRS = [("wrn_40_2", "wrn_16_2"), ("wrn_40_2", "wrn_40_1"), ("resnet56", "resnet20"),
             ("resnet110", "resnet20"), ("resnet110", "resnet32"), ("resnet32x4", "resnet8x4"),
             ("vgg13", "vgg8")]
R32X4 = ("resnet32x4", "resnet8x4")  # the pair of M's one CIFAR config

#: kt-bench's cross-entropy is float32 even for float64 logits: its rounding (about 5e-7 of a
#: cross-entropy near 4.6) bounds the agreement of float64 totals.
CE_ROUNDING = 2e-6


def grid_options(name: str, pair: tuple[str, str]) -> dict:
    """The grid's options of ``name`` for ``pair``."""
    options = dict(GRID_OPTIONS[name])
    if pair[0].startswith("vgg"):
        options["layers"] = VGG_LAYERS
    return options


def central_differences(fn, x: torch.Tensor, step: float) -> list[float]:
    """(fn(x + step·e_i) − fn(x − step·e_i)) / (2·step) for every element i (``fn`` may return
    a Python float)."""
    flat = x.detach().clone().flatten()
    out = []
    for i in range(flat.numel()):
        plus, minus = flat.clone(), flat.clone()
        plus[i] += step
        minus[i] -= step
        out.append((float(fn(plus.view_as(x))) - float(fn(minus.view_as(x)))) / (2 * step))
    return out


# ---- combinations ----------------------------------------------------------------------------

#: Where each method's own trainable parts live in a combination.
OWNED = {"reviewkd": ".abfs.", "ofd": ".connectors."}


def check_combination(spec: str, names: set[str]) -> None:
    """The combination ``spec`` builds, prepares, returns every member's term (finite,
    positive, weighted), and every member's own parts are in the optimiser with gradients."""
    torch.manual_seed(0)
    student, teacher = build_model("resnet8", 10), build_model("resnet8x4", 10)
    method = build_method(spec, method_config(spec))
    x = torch.randn(4, 3, 32, 32, generator=gen(3))
    y = torch.randint(0, 10, (4,), generator=gen(4))
    prepare(method, student, teacher, x, num_classes=10)
    trainee = Trainee(student, method).train()
    optimizer = torch.optim.SGD(trainee.parameters(), lr=0.1)
    plan = main_plan(method, 0, 240)
    logits, terms = trainee(x, read_teacher(method, teacher, x), plan.batch(y))
    assert set(terms) == names
    assert all(v.dim() == 0 and torch.isfinite(v) and v > 0 for v in terms.values())
    weights = method.term_weights(0, 240)
    assert set(weights) == names and all(w > 0 for w in weights.values())
    total_loss(logits, y, terms, plan.weights, plan.ce_weight).backward()
    params = dict(method.named_parameters())
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    for name in names - {"kd"}:
        mine = {n: p for n, p in params.items() if OWNED[name] in n}
        assert mine and all(id(p) in in_optimizer for p in mine.values())
        assert any(torch.count_nonzero(p.grad) > 0 for p in mine.values()), name


# ---- against mdistiller's forward_train ------------------------------------------------------

def perturb_batchnorm(model: nn.Module, g: torch.Generator) -> None:
    """Non-trivial BN affine parameters (some weights negative, some biases far above the
    weight, so both branches of OFD's margin are taken) and running statistics estimated on a
    random batch (so eval-mode activations stay of order 1 through deep networks)."""
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in bns:
        c = m.num_features
        sign = torch.where(torch.rand(c, generator=g) < 0.2, -1.0, 1.0)
        with torch.no_grad():
            m.weight.copy_((torch.rand(c, generator=g) + 0.5) * sign)
            m.bias.copy_(torch.randn(c, generator=g) * 0.5)
            m.bias[: max(1, c // 8)] = 4 * m.weight[: max(1, c // 8)].abs()
        m.reset_running_stats()
        m.momentum = None  # the running statistics become the calibration batch's
    was_training = model.training
    model.train()
    with torch.no_grad():
        model(torch.randn(16, 3, 32, 32, generator=g))
    for m in bns:
        m.momentum = 0.1
    model.train(was_training)


def setup(pair: tuple[str, str], name: str, options: dict):
    """(teacher, student, x, y, method): the pair with perturbed BNs, a batch, and ``name``
    built with ``options`` and prepared on the batch."""
    teacher, student, x, y = reference_models(*pair, perturb_batchnorm)
    method = build_method(name, method_config(name, {name: options}))
    prepare(method, student, teacher, x)
    return teacher, student, x, y, method


def kt_bench_loss(method: Method, student: nn.Module, teacher: nn.Module, x: torch.Tensor,
                  y: torch.Tensor, epoch: int, epochs: int = 240) -> torch.Tensor:
    """The loss the engine's step computes on (x, y) in ``epoch`` (0-based), the teacher as
    the engine runs it for this method (eval mode, or a private train-mode copy)."""
    return one_step(method, student, teacher, x, y, epoch, epochs).loss


def assert_same_gradients(ours: torch.Tensor, theirs: torch.Tensor, our_params,
                          their_params, rel: float) -> None:
    """The gradients of the two losses agree to ``rel`` (relative norm of the difference)."""
    g_ours = torch.autograd.grad(ours, our_params)
    g_theirs = torch.autograd.grad(theirs, their_params)
    assert [g.shape for g in g_ours] == [g.shape for g in g_theirs]
    a = torch.cat([g.flatten() for g in g_ours])
    b = torch.cat([g.flatten() for g in g_theirs])
    assert ((a - b).norm() / b.norm()).item() < rel


def double(*modules: nn.Module) -> None:
    """Every module in float64."""
    for module in modules:
        module.double()

