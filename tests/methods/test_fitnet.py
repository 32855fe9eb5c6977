"""``fitnet``: the loss against its formula, its gradient, the ``regressor`` forms, and the
crd-cifar100 cell's loss against RepDistiller's (tests/repdistiller_ref.py)."""

from __future__ import annotations

import pytest
import torch
from kt_bench.methods.fitnet import REGRESSORS, FitNet, build_regressor, fitnet_loss
from torch import nn

from kt_bench.api.method import Batch, build_method
from kt_bench.core.errors import ConfigError

from .composition import PAIRS, check_cell_loss_equals_repdistillers
from .loops import check_feature_gradient

torch.manual_seed(0)


# ---- the loss --------------------------------------------------------------------------------

def test_fitnet_loss_is_elementwise_mse():
    a, b = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    pairs = zip(a.flatten().tolist(), b.flatten().tolist(), strict=True)
    expected = sum((x - y) ** 2 for x, y in pairs) / a.numel()
    assert fitnet_loss(a, b).item() == pytest.approx(expected, rel=1e-5)


def test_gradient_reaches_the_student_only_and_matches_finite_differences():
    check_feature_gradient(fitnet_loss)


# ---- the regressor ---------------------------------------------------------------------------

def _fitnet(form, s_shape, t_shape):
    method = FitNet(regressor=form)
    method.setup({"stage2": torch.Size(s_shape)}, {"stage2": torch.Size(t_shape)})
    return method


def _check_bn_relu(reg, c_t):
    assert isinstance(reg, nn.Sequential) and len(reg) == 3
    assert isinstance(reg[1], nn.BatchNorm2d) and reg[1].num_features == c_t
    assert isinstance(reg[2], nn.ReLU)


@pytest.mark.parametrize("s_hw,t_hw,conv_type,kernel,stride,padding", [
    (8, 8, nn.Conv2d, (1, 1), (1, 1), (0, 0)),            # equal sizes: 1x1 conv
    (16, 8, nn.Conv2d, (3, 3), (2, 2), (1, 1)),           # student twice the teacher's
    (4, 8, nn.ConvTranspose2d, (4, 4), (2, 2), (1, 1)),   # student half the teacher's
    (6, 4, nn.Conv2d, (3, 3), (1, 1), (0, 0)),            # otherwise: kernel 1 + s − t
])
def test_fitnet_convreg_is_repdistillers_conv_reg(s_hw, t_hw, conv_type, kernel, stride,
                                                   padding):
    c_s, c_t = 6, 10
    method = _fitnet("convreg", (2, c_s, s_hw, s_hw), (2, c_t, t_hw, t_hw))
    reg = method.regressor
    _check_bn_relu(reg, c_t)
    conv = reg[0]
    assert type(conv) is conv_type
    assert (conv.in_channels, conv.out_channels) == (c_s, c_t)
    assert (conv.kernel_size, conv.stride, conv.padding) == (kernel, stride, padding)
    assert conv.bias is not None
    assert [k for k in reg.state_dict() if not k.startswith("bn.")] == ["conv.weight",
                                                                         "conv.bias"]
    f_s = torch.randn(2, c_s, s_hw, s_hw)
    assert reg(f_s).shape == (2, c_t, t_hw, t_hw)
    teacher = {"stage2": torch.randn(2, c_t, t_hw, t_hw)}
    batch = Batch(torch.zeros(2, dtype=torch.long))
    loss = method.loss_terms({"stage2": f_s}, teacher, batch)["fitnet"]
    assert loss.ndim == 0 and loss.item() > 0


def test_fitnet_convreg_handles_non_square_maps():
    reg = build_regressor("convreg", torch.Size((2, 3, 7, 5)), torch.Size((2, 4, 4, 4)))
    assert reg[0].kernel_size == (4, 2)
    assert reg(torch.randn(2, 3, 7, 5)).shape == (2, 4, 4, 4)


def test_fitnet_convreg_refuses_a_smaller_student_that_is_not_half():
    with pytest.raises(ValueError, match="cannot map a 3x3 student map to a 8x8"):
        build_regressor("convreg", torch.Size((2, 3, 3, 3)), torch.Size((2, 4, 8, 8)))


def test_fitnet_default_regressor_is_the_3x3_conv_without_bias():
    method = _fitnet("conv3x3", (2, 6, 8, 8), (2, 10, 4, 4))
    assert FitNet().regressor_form == "conv3x3"
    reg = method.regressor
    _check_bn_relu(reg, 10)
    conv = reg[0]
    assert type(conv) is nn.Conv2d
    assert (conv.kernel_size, conv.stride, conv.padding) == ((3, 3), (1, 1), (1, 1))
    assert conv.bias is None
    assert list(reg.state_dict())[:2] == ["0.weight", "1.weight"]  # keys as before the option
    assert reg(torch.randn(2, 6, 8, 8)).shape == (2, 10, 8, 8)  # the loss aligns sizes


def test_fitnet_unknown_regressor_lists_the_accepted_ones():
    assert REGRESSORS == ("conv3x3", "convreg")
    with pytest.raises(ValueError, match="unknown FitNet regressor 'conv1x1'; accepted: "
                                         "conv3x3, convreg"):
        FitNet(regressor="conv1x1")
    with pytest.raises(ConfigError, match="accepted: conv3x3, convreg"):
        build_method("fitnet", {"fitnet": {"regressor": "conv1x1"}})


def test_fitnet_reports_the_regressor_option_not_the_module():
    method = build_method("fitnet", {"fitnet": {"regressor": "convreg"}})
    assert method.regressor_form == "convreg" and method.regressor is None
    assert method.describe()["regressor"] == "convreg"
    method.setup({"stage2": torch.Size((2, 4, 8, 8))}, {"stage2": torch.Size((2, 8, 8, 8))})
    assert isinstance(method.regressor, nn.Sequential)
    assert method.describe()["regressor"] == "convreg"


# ---- composition: the cell vs RepDistiller ----------------------------------------------------

@pytest.mark.parametrize("teacher_name,student_name", PAIRS)
def test_cell_loss_equals_repdistillers(teacher_name, student_name):
    check_cell_loss_equals_repdistillers("fitnet", teacher_name, student_name)
