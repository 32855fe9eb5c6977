"""NST's ``layers`` option (the sum over several taps) and FitNet's ``regressor`` forms."""

import pytest
import torch
from kt_bench.methods.fitnet import REGRESSORS, FitNet, build_regressor
from kt_bench.methods.nst import NSTGauss, NSTLinear, NSTPoly, nst_loss
from torch import nn

from kt_bench.errors import ConfigError
from kt_bench.method import build_method

torch.manual_seed(0)


# ---- NST: layers ----------------------------------------------------------------------------

NST_CLASSES = [
    (NSTLinear, "linear", {}),
    (NSTPoly, "poly", {"degree": 3, "c": 1.0}),
    (NSTGauss, "gaussian", {"sigma2": None}),
    (NSTGauss, "gaussian", {"sigma2": 0.5}),
]


@pytest.mark.parametrize("cls,kernel,opts", NST_CLASSES,
                         ids=["linear", "poly", "gauss", "gauss-fixed"])
def test_nst_default_is_the_single_last_map(cls, kernel, opts):
    method = cls(**opts)
    assert method.layers == ("feat",)
    assert method.taps == ("feat",)
    assert method.align == "pool"
    student = {"feat": torch.randn(2, 3, 4, 4)}
    teacher = {"feat": torch.randn(2, 5, 4, 4)}
    got = method.loss_terms(student, teacher)[method.name]
    want = nst_loss(student["feat"], teacher["feat"], kernel=kernel, **opts)
    assert got.item() == pytest.approx(want.item(), rel=1e-6)


@pytest.mark.parametrize("cls,kernel,opts", NST_CLASSES,
                         ids=["linear", "poly", "gauss", "gauss-fixed"])
def test_nst_sums_over_the_layers(cls, kernel, opts):
    layers = ["stage1", "stage2", "stage3"]  # a list, as a grid's TOML gives it
    method = cls(layers=layers, align="pool", **opts)
    assert method.layers == ("stage1", "stage2", "stage3")
    assert method.taps == method.layers
    for key, value in opts.items():
        assert getattr(method, key) == value
    # stage maps of halving size, student's larger than the teacher's at stage 3 (pooled)
    student = {"stage1": torch.randn(2, 4, 8, 8), "stage2": torch.randn(2, 6, 4, 4),
               "stage3": torch.randn(2, 8, 4, 4)}
    teacher = {"stage1": torch.randn(2, 5, 8, 8), "stage2": torch.randn(2, 7, 4, 4),
               "stage3": torch.randn(2, 9, 2, 2)}
    got = method.loss_terms(student, teacher)[method.name]
    want = sum(nst_loss(student[k], teacher[k], kernel=kernel, **opts).item() for k in layers)
    assert got.item() == pytest.approx(want, rel=1e-5)
    assert got.item() > 0


def test_nst_keeps_its_other_options():
    poly = NSTPoly(weight=10.0, layers=("feat_pre",), align="interpolate", degree=3, c=0.5)
    assert (poly.weight, poly.layers, poly.align, poly.degree, poly.c) == (
        10.0, ("feat_pre",), "interpolate", 3, 0.5)
    gauss = NSTGauss(sigma2=0.25)
    assert gauss.sigma2 == 0.25 and gauss.weight == 50.0


@pytest.mark.parametrize("name", ["nst_linear", "nst_poly", "nst_gauss"])
def test_nst_option_tap_is_gone(name):
    with pytest.raises(ConfigError, match="unknown option 'tap'.*layers"):
        build_method(name, {name: {"tap": "feat"}})
    method = build_method(name, {name: {"layers": ["stage2", "stage3"]}})
    assert method.taps == ("stage2", "stage3")


def test_nst_layers_must_be_a_list_of_names():
    with pytest.raises(ValueError, match="list of tap names"):
        NSTPoly(layers="feat")
    with pytest.raises(ValueError, match="at least one"):
        NSTPoly(layers=())


# ---- FitNet: regressor ----------------------------------------------------------------------

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
    loss = method.loss_terms({"stage2": f_s}, teacher)["fitnet"]
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
