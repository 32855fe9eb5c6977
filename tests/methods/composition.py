"""kt-bench's side of the method tests that compare it with a reference: a method prepared on a
probe batch, the teacher read and one engine step's loss computed, each through
:mod:`kt_bench.training.lifecycle` as the engine does them; seeded pairs of models and batches;
and the configured cells of the crd-cifar100 grid beside the reference toolkits' own
composition of that step (RepDistiller's ``train_distill``, re-stated in
tests/repdistiller_ref.py, and the logit methods' authors' code, tests/ref_logit_methods.py)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import pytest
import torch
from torch import nn

from kt_bench.api.method import Method, build_method, method_config
from kt_bench.core.errors import ConfigError
from kt_bench.models import build_model
from kt_bench.sweep.cells import Cell, expand
from kt_bench.sweep.config import load_grid
from kt_bench.training import lifecycle
from kt_bench.training.recipe import Recipe

from ..repdistiller_ref import make_r_convreg, repdistiller_loss

# ---- preparing and stepping a method as the engine does ------------------------------------


def gen(seed: int) -> torch.Generator:
    """A CPU random generator seeded with ``seed``."""
    return torch.Generator().manual_seed(seed)


def configured(name: str, options: dict | None = None) -> Method:
    """Method ``name`` built from its configuration: its defaults, updated by ``options``
    (``{name: {...}}``, as a grid's ``[method_options]``)."""
    return build_method(name, method_config(name, options))


def assert_config_error(name: str, options: dict, match: str | None = None) -> None:
    """Building method ``name`` with its ``options`` is a ConfigError (whose message matches
    ``match``, where given)."""
    with pytest.raises(ConfigError, match=match):
        build_method(name, {name: options})


def prepare(method: Method, student: nn.Module, teacher: nn.Module, x: torch.Tensor,
            labels: torch.Tensor | None = None, num_classes: int = 100) -> Method:
    """``method`` prepared as the engine prepares it, on the probe batch ``x`` and the training
    set's ``labels`` (by default zeros, one per image: for methods that do not read them)."""
    if labels is None:
        labels = torch.zeros(x.shape[0], dtype=torch.long)
    lifecycle.prepare_on_probe(method, student, teacher, labels, num_classes, x)
    return method


def read_teacher(method: Method, teacher: nn.Module, x: torch.Tensor,
                 autocast: lifecycle.Autocast | None = None) -> dict[str, torch.Tensor] | None:
    """The teacher's taps on ``x`` as the engine's step gives them to ``method``: the frozen
    teacher in eval mode, or the private copy on the batch's statistics where the method asks
    for one (the shared teacher is left as it is); None for a method without a teacher."""
    teacher.eval()
    taps = lifecycle.TeacherTaps(teacher, [method])
    try:
        return lifecycle.TeacherTaps.of(method, taps.read(x, [method], autocast))
    finally:
        taps.remove()


def main_plan(method: Method, epoch: int, epochs: int,
              recipe_ce: float = 1.0) -> lifecycle.EpochPlan:
    """The engine's plan of main-stage ``epoch`` (0-based) of ``epochs``, for a recipe whose
    cross-entropy weight is ``recipe_ce``."""
    return lifecycle.plan_epoch(method, method.needs.init_epochs + epoch, epochs,
                                lifecycle.base_ce_weight(method, recipe_ce))


def step(trainee: lifecycle.Trainee, teacher: nn.Module, x: torch.Tensor, y: torch.Tensor,
         epoch: int = 0, epochs: int = 1, recipe_ce: float = 1.0,
         autocast: lifecycle.Autocast | None = None, indices: torch.Tensor | None = None,
         seed: int = 0) -> lifecycle.StepLoss:
    """The forward pass and loss of the engine's step on (``x``, ``y``; the samples'
    ``indices`` and the step's ``seed`` where the method reads them) in main-stage ``epoch`` of
    ``epochs`` (the trainee in train mode; teacher and student under ``autocast()`` where
    given)."""
    method = trainee.method
    t_taps = read_teacher(method, teacher, x, autocast)
    plan = main_plan(method, epoch, epochs, recipe_ce)
    batch = plan.batch(y, indices, seed)
    trainee.train()
    with autocast() if autocast else contextlib.nullcontext():
        return lifecycle.step_loss(trainee, x, batch, t_taps, plan)


def one_step(method: Method, student: nn.Module, teacher: nn.Module, x: torch.Tensor,
             y: torch.Tensor, epoch: int = 0, epochs: int = 1, recipe_ce: float = 1.0,
             autocast: lifecycle.Autocast | None = None, indices: torch.Tensor | None = None,
             seed: int = 0) -> lifecycle.StepLoss:
    """:func:`step` of a fresh :class:`~kt_bench.training.lifecycle.Trainee` of ``student``
    and ``method`` (its tap hooks removed afterwards)."""
    trainee = lifecycle.Trainee(student, method)
    try:
        return step(trainee, teacher, x, y, epoch, epochs, recipe_ce, autocast, indices, seed)
    finally:
        trainee.recorder.remove()


def step_total(method: Method, recipe: Recipe, student: nn.Module, teacher: nn.Module,
               x: torch.Tensor, y: torch.Tensor, epoch: int = 0,
               indices: torch.Tensor | None = None, seed: int = 0) -> torch.Tensor:
    """The loss the engine's step of ``recipe``'s main-stage ``epoch`` (0-based) computes on
    (``x``, ``y``) for a prepared ``method``."""
    return one_step(method, student, teacher, x, y, epoch, recipe.epochs, recipe.ce_weight,
                    indices=indices, seed=seed).loss


# ---- seeded models and batches ---------------------------------------------------------------

def perturb_batchnorm(model: nn.Module, gen: torch.Generator) -> None:
    """Non-trivial BN statistics and affine parameters, so eval-mode BN is not the identity."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.1)


#: How a test sets a freshly built model's BatchNorm layers: ``adjust(model, generator)``.
AdjustBN = Callable[[nn.Module, torch.Generator], None]


def seeded_models(teacher_name: str, student_name: str,
                  adjust: AdjustBN = perturb_batchnorm
                  ) -> tuple[nn.Module, nn.Module, torch.Generator]:
    """(teacher, student, generator): the 100-class pair built after ``torch.manual_seed(0)``,
    each then ``adjust``-ed with the one generator (seeded 0), which the caller draws its batch
    from next."""
    g = gen(0)
    torch.manual_seed(0)
    teacher = build_model(teacher_name, 100)
    student = build_model(student_name, 100)
    adjust(teacher, g)
    adjust(student, g)
    return teacher, student, g


def reference_models(teacher_name: str, student_name: str,
                     adjust: AdjustBN = perturb_batchnorm
                     ) -> tuple[nn.Module, nn.Module, torch.Tensor, torch.Tensor]:
    """(teacher, student, x, y): :func:`seeded_models`, and a batch of eight 32x32 images with
    labels drawn from its generator."""
    teacher, student, g = seeded_models(teacher_name, student_name, adjust)
    x = torch.randn(8, 3, 32, 32, generator=g)
    y = torch.randint(0, 100, (8,), generator=g)
    return teacher, student, x, y


# ---- the crd-cifar100 grid's cells against RepDistiller's composition ------------------------

#: The (teacher, student) pairs of the RepDistiller composition test: a ResNet, a WRN, VGG.
PAIRS = [("resnet56", "resnet20"), ("wrn_40_2", "wrn_16_2"), ("vgg13", "vgg8")]

#: The crd-cifar100 grid's cells by (teacher, student, method).
CELLS = {(c.teacher.name, c.student.name, c.method): c for c in expand(load_grid("crd-cifar100"))}


def _convreg_like(method: Method) -> nn.Module:
    """RepDistiller's ConvReg holding the weights of kt-bench's FitNet regressor."""
    conv = method.regressor.conv
    # equal sizes at stage2 (16x16) in all three pairs: R's rule gives a 1x1 conv
    r = make_r_convreg((1, conv.in_channels, 16, 16), (1, conv.out_channels, 16, 16))
    r.load_state_dict(method.regressor.state_dict())  # fails unless the layers and bias match
    return r


def check_cell_loss_equals_repdistillers(method_name: str, teacher_name: str,
                                         student_name: str) -> None:
    """The crd-cifar100 cell of ``method_name`` on the pair computes RepDistiller's loss on
    one batch, and gives the student RepDistiller's gradient."""
    cell: Cell = CELLS[(teacher_name, student_name, method_name)]
    teacher, student, x, y = reference_models(teacher_name, student_name)
    method = prepare(build_method(cell.method, cell.method_config), student, teacher, x, y)
    ours = step_total(method, cell.recipe, student, teacher, x, y)
    convreg = _convreg_like(method) if method_name == "fitnet" else None
    theirs = repdistiller_loss(method_name, student, teacher, x, y, convreg)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-5, abs=1e-6)
    # and the gradient the student gets is the same
    g_ours = torch.autograd.grad(ours, list(student.parameters()))
    theirs = repdistiller_loss(method_name, student, teacher, x, y, convreg)
    g_theirs = torch.autograd.grad(theirs, list(student.parameters()))
    a = torch.cat([g.flatten() for g in g_ours])
    b = torch.cat([g.flatten() for g in g_theirs])
    assert ((a - b).norm() / b.norm()).item() < 1e-5  # float32 rounding, elementwise noisier


def check_vgg_cells_use_all_four_stage_outputs(method: str) -> None:
    """The grid's VGG cells of ``method`` read all four stages, the ResNet ones three."""
    cell = CELLS[("vgg13", "vgg8", method)]
    assert cell.method_config[method]["layers"] == ["stage1", "stage2", "stage3", "stage4"]
    cell = CELLS[("resnet56", "resnet20", method)]
    assert cell.method_config[method]["layers"] == ["stage1", "stage2", "stage3"]


# ---- the logit methods against their authors' code (tests/ref_logit_methods.py) ----------------

#: The pairs of the logit methods' composition tests.
LOGIT_PAIRS = [("resnet56", "resnet20"), ("vgg13", "vgg8")]


def configured_loss(name: str, options: dict, teacher: nn.Module, student: nn.Module,
                    x: torch.Tensor, y: torch.Tensor, epoch: int, epochs: int = 240
                    ) -> torch.Tensor:
    """The engine step's loss in ``epoch`` of a ``epochs``-epoch recipe (CE weight 1) for
    method ``name`` configured with ``options``."""
    method = prepare(configured(name, {name: options}), student, teacher, x, y)
    return step_total(method, Recipe(epochs=epochs), student, teacher, x, y, epoch)


def assert_same_loss_and_gradient(ours: torch.Tensor, theirs: torch.Tensor, student: nn.Module,
                                  rel: float = 1e-5) -> None:
    """Equal totals, and equal gradients for the student's parameters."""
    assert ours.item() == pytest.approx(theirs.item(), rel=rel, abs=1e-6)
    params = list(student.parameters())
    a = torch.cat([g.flatten() for g in torch.autograd.grad(ours, params)])
    b = torch.cat([g.flatten() for g in torch.autograd.grad(theirs, params)])
    assert ((a - b).norm() / b.norm()).item() < 1e-4
