"""The crd-cifar100 grid's cells compute RepDistiller's training loss, exactly.

For every method of the grid and for a ResNet, a WRN and the VGG pair, the loss kt-bench's
configured cell computes on one batch (through the engine's own loss composition) equals an
independent re-statement of RepDistiller's ``train_distill`` composition
(tests/repdistiller_ref.py) on the same weights and batch.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kt_bench.cells import Cell, expand
from kt_bench.config import load_grid
from kt_bench.engine import Trainee, base_ce_weight, setup_method, teacher_taps, total_loss
from kt_bench.method import Batch, build_method
from kt_bench.models import build_model
from kt_bench.taps import TapRecorder

from .repdistiller_ref import make_r_convreg, repdistiller_loss

PAIRS = [("resnet56", "resnet20"), ("wrn_40_2", "wrn_16_2"), ("vgg13", "vgg8")]
CELLS = {(c.teacher.name, c.student.name, c.method): c for c in expand(load_grid("crd-cifar100"))}


def _perturb_batchnorm(model: nn.Module, gen: torch.Generator) -> None:
    """Non-trivial BN statistics and affine parameters, so eval-mode BN is not the identity."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=gen) * 0.1)


def kt_bench_loss(cell: Cell, student: nn.Module, teacher: nn.Module, x, y, epoch: int = 0,
                  method=None):
    """The loss the cell's engine step computes on (x, y) in ``epoch`` (0-based), and the
    method (built from the cell's stored options and set up on ``x`` unless given)."""
    if method is None:
        method = build_method(cell.method, cell.method_config)
        setup_method(method, student, teacher, x)
    trainee = Trainee(student, method).train()
    t_taps = None
    if method.needs_teacher:
        recorder = TapRecorder(teacher, teacher.tap_map, method.taps)
        t_taps = teacher_taps(teacher.eval(), recorder, x)
        recorder.remove()
    epochs = cell.recipe.epochs
    logits, terms = trainee(x, t_taps, Batch(y, epoch, epochs))
    trainee.recorder.remove()
    ce = base_ce_weight(method, cell.recipe) * method.ce_scale(epoch, epochs)
    return total_loss(logits, y, terms, method.term_weights(epoch, epochs), ce), method


def _convreg_like(method) -> nn.Module:
    """RepDistiller's ConvReg holding the weights of kt-bench's FitNet regressor."""
    conv = method.regressor.conv
    # equal sizes at stage2 (16x16) in all three pairs: R's rule gives a 1x1 conv
    r = make_r_convreg((1, conv.in_channels, 16, 16), (1, conv.out_channels, 16, 16))
    r.load_state_dict(method.regressor.state_dict())  # fails unless the layers and bias match
    return r


@pytest.mark.parametrize("teacher_name,student_name", PAIRS)
@pytest.mark.parametrize("method_name", ["student", "kd", "fitnet", "at", "nst_poly"])
def test_cell_loss_equals_repdistillers(teacher_name, student_name, method_name):
    cell = CELLS[(teacher_name, student_name, method_name)]
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    teacher = build_model(cell.teacher, 100)
    student = build_model(cell.student, 100)
    _perturb_batchnorm(teacher, gen)
    _perturb_batchnorm(student, gen)
    x = torch.randn(8, 3, 32, 32, generator=gen)
    y = torch.randint(0, 100, (8,), generator=gen)
    ours, method = kt_bench_loss(cell, student, teacher, x, y)
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


def test_vgg_cells_use_all_four_stage_outputs():
    for method in ("at", "nst_poly"):
        cell = CELLS[("vgg13", "vgg8", method)]
        assert cell.method_config[method]["layers"] == ["stage1", "stage2", "stage3", "stage4"]
        cell = CELLS[("resnet56", "resnet20", method)]
        assert cell.method_config[method]["layers"] == ["stage1", "stage2", "stage3"]


def _verified_options(name: str, pair: tuple[str, str]) -> dict | None:
    """The options each method's composition test checked against its reference code, for
    ``pair`` (None where the reference has no configuration for it)."""
    from .ref_logit_methods import LS_KD_PAIRS, M_DKD_BETA
    from .test_method_crd import GRID_OPTIONS as CRD
    from .test_methods_ab_ft_fsp import grid_options as init_grid_options
    from .test_methods_cc_vid import GRID_OPTIONS as CC_VID
    from .test_methods_cc_vid import VGG_LAYERS
    from .test_methods_reviewkd_ofd import grid_options as m_feature_grid_options
    from .test_methods_sp_pkt_rkd import _grid_options

    if name in ("sp", "pkt", "rkd"):
        return _grid_options(pair, name)
    if name in ("ab", "ft", "fsp"):
        return init_grid_options(name, pair)
    if name in ("reviewkd", "ofd"):
        return m_feature_grid_options(name, pair)
    if name in ("cc", "vid"):
        options = dict(CC_VID[name])
        if name == "vid" and pair[0].startswith("vgg"):
            options["layers"] = VGG_LAYERS
        return options
    if name == "dkd":
        return {"beta": M_DKD_BETA[pair]} if pair in M_DKD_BETA else None
    if name == "crd":
        return CRD["crd"]
    if name == "kd_ls":
        T, weight = LS_KD_PAIRS[pair]
        return {"ce_weight": 0.1, "T": T, "weight": weight}
    return {}  # dist: the defaults are the authors' configuration


@pytest.mark.parametrize("name", ["sp", "pkt", "rkd", "cc", "vid", "dkd", "dist", "kd_ls",
                                  "crd", "ab", "ft", "fsp", "reviewkd", "ofd"])
def test_the_grid_runs_the_configurations_the_reference_tests_verified(name):
    """Each method's composition test (tests/test_methods_*.py) checks kt-bench's loss against
    its reference code for given options; the grid's cells must carry exactly those."""
    from kt_bench.method import method_config

    pairs = {(t, s) for t, s, _ in CELLS}
    assert len(pairs) == 7
    for pair in sorted(pairs):
        options = _verified_options(name, pair)
        cell = CELLS[(*pair, name)]
        if options is None:  # no reference configuration: the grid says it runs the default
            assert name == "dkd" and pair == ("resnet110", "resnet20")
            assert cell.method_config == method_config("dkd")
            continue
        assert cell.method_config == method_config(name, {name: options}), pair


def test_the_grids_crd_plus_kd_is_the_one_verified():
    """tests/test_method_crd.py checks crd+kd with CE 1, KD 1 (RepDistiller's -a 1 -b 0.8)."""
    from kt_bench.method import method_config

    from .test_method_crd import GRID_OPTIONS as CRD

    verified = method_config("crd+kd", {**CRD, "kd": {**CRD["kd"], "ce_weight": 1.0}})
    for pair in {(t, s) for t, s, _ in CELLS}:
        assert CELLS[(*pair, "crd+kd")].method_config == verified
    assert CELLS[("resnet56", "resnet20", "kd")].method_config["kd"]["ce_weight"] == 0.1
