"""--precision auto: bf16 autocast where the CPU multiplies bf16 natively (the capability is
stubbed here, so no test depends on this machine's CPU), full precision elsewhere; methods
that need float32 terms get them under autocast."""

from __future__ import annotations

import json

import pytest
import torch

from kt_bench.api.method import Batch, Method, Needs, build_method, register_method
from kt_bench.commands.main import main
from kt_bench.core import precision as prec
from kt_bench.core.precision import cpu_has_native_bf16, resolve_precision

from .conftest import write_tiny_grid


@pytest.fixture
def cpu_bf16(monkeypatch):
    """Set what the CPU reports: ``cpu_bf16(avx512_bf16, amx)``."""

    def stub(avx512_bf16: bool, amx: bool = False) -> None:
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16,
                            raising=False)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
        monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
        cpu_has_native_bf16.cache_clear()

    yield stub
    cpu_has_native_bf16.cache_clear()


@pytest.mark.parametrize(("avx512_bf16", "amx", "expected"),
                         [(True, False, "bf16"), (False, True, "bf16"), (True, True, "bf16"),
                          (False, False, "no")])
def test_auto_is_bf16_on_a_cpu_with_native_bf16_and_fp32_elsewhere(cpu_bf16, avx512_bf16, amx,
                                                                  expected):
    cpu_bf16(avx512_bf16, amx)
    assert resolve_precision("auto", "cpu") == expected
    assert resolve_precision("auto", "auto") == expected  # no CUDA: the CPU decides
    for given in ("no", "bf16", "fp16"):  # an explicit choice is kept
        assert resolve_precision(given, "cpu") == given


def test_without_pytorchs_checks_the_kernels_flags_decide(monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", None, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", None, raising=False)
    for flags, expected in (({"avx512f", "avx512_bf16"}, True), ({"amx_bf16"}, True),
                            ({"avx2", "avx512f"}, False), (set(), False)):
        monkeypatch.setattr(prec, "_cpuinfo_flags", lambda flags=flags: flags)
        cpu_has_native_bf16.cache_clear()
        assert cpu_has_native_bf16() is expected
    cpu_has_native_bf16.cache_clear()


def test_cpuinfo_flags_are_read_from_the_kernels_file(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu sse avx512f avx512_bf16 amx_tile\n"
                    "processor\t: 1\nflags\t\t: fpu\n")
    assert prec._cpuinfo_flags(info) == {"fpu", "sse", "avx512f", "avx512_bf16", "amx_tile"}
    assert prec._cpuinfo_flags(tmp_path / "missing") == set()


@pytest.mark.parametrize(("native", "expected"), [(True, "bf16"), (False, "no")])
def test_a_run_without_a_precision_flag_trains_in_what_auto_picks_and_says_so(
        cpu_bf16, tmp_path, capsys, native, expected):
    cpu_bf16(native)
    grid = write_tiny_grid(tmp_path, methods=("student",), epochs=1)
    out = tmp_path / "run"
    assert main(["run", "--grid", str(grid), "--out", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert f"(precision {expected}," in printed
    (row_file,) = (out / "cells").glob("*/result.json")
    assert json.loads(row_file.read_text())["precision"] == expected
    assert main(["report", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert {"bf16": "bf16 autocast", "no": "fp32"}[expected] in report


#: The batch the recording method's terms are computed for (it reads none of it).
BATCH = Batch(torch.zeros(4, dtype=torch.long))


class _Recording(Method):
    """Records the dtype of the taps it sees and whether autocast was on."""

    default_weight = 1.0

    def __init__(self, weight: float | None = None) -> None:
        super().__init__(weight)
        self.taps = ("feat",)
        self.seen: list[tuple[torch.dtype, bool]] = []

    def loss_terms(self, student, teacher, batch):
        self.seen.append((student["feat"].dtype, torch.is_autocast_enabled("cpu")))
        product = student["feat"].flatten(1) @ teacher["feat"].flatten(1).T
        return {self.name: product.mean()}


@pytest.mark.parametrize("float32_terms", [False, True])
def test_a_method_can_ask_for_its_terms_in_float32_under_autocast(float32_terms):
    @register_method("recording")
    class Recording(_Recording):
        needs = Needs(float32_terms=float32_terms)

    method = build_method("recording")
    feat = torch.randn(4, 3, 5, 5)
    weight = torch.randn(3, 3, 1, 1, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        student = {"feat": torch.nn.functional.conv2d(feat, weight)}
        teacher = {"feat": torch.nn.functional.conv2d(feat, weight.detach())}
        term = method.terms(student, teacher, BATCH)["recording"]
    assert student["feat"].dtype == torch.bfloat16  # what autocast made
    expected = (torch.float32, False) if float32_terms else (torch.bfloat16, True)
    assert method.seen == [expected]
    assert term.dtype == (torch.float32 if float32_terms else torch.bfloat16)
    term.backward()  # the cast keeps the student's gradient
    assert weight.grad is not None and weight.grad.abs().sum() > 0
    # outside autocast nothing is cast, whatever the method asks
    method.seen.clear()
    method.terms({"feat": feat.double()}, {"feat": feat.double()}, BATCH)
    assert method.seen == [(torch.float64, False)]


def test_a_combination_casts_only_the_member_that_asks():
    @register_method("wants_fp32")
    class WantsFP32(_Recording):
        needs = Needs(float32_terms=True)

    @register_method("takes_bf16")
    class TakesBF16(_Recording):
        pass

    combined = build_method("wants_fp32+takes_bf16")
    feat = torch.randn(2, 3, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        x = torch.nn.functional.conv2d(feat, torch.randn(3, 3, 1, 1))
        combined.terms({"feat": x}, {"feat": x}, BATCH)
    first, second = combined.members
    assert first.seen == [(torch.float32, False)] and second.seen == [(torch.bfloat16, True)]


FP16_OFF_CUDA = "kt-bench: error: --precision fp16 needs a CUDA device; on the CPU use bf16 or no\n"


@pytest.mark.parametrize("device", ["cpu", "auto"])
@pytest.mark.parametrize("dry_run", [False, True], ids=["run", "dry-run"])
def test_fp16_off_cuda_is_refused_before_anything_runs(tmp_path, capsys, monkeypatch, device,
                                                       dry_run):
    """Accelerate takes fp16 on the CPU but runs no autocast there: the rows would say fp16
    of numbers that are fp32's, bit for bit."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = tmp_path / "out"
    code = main(["run", "--grid", str(write_tiny_grid(tmp_path)), "--out", str(out),
                 "--device", device, "--precision", "fp16", *(["--dry-run"] if dry_run else [])])
    assert code == 2 and capsys.readouterr().err == FP16_OFF_CUDA
    assert not out.exists()


def test_fp16_off_cuda_is_refused_by_bench_too(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    code = main(["bench", "--device", "cpu", "--precision", "no,fp16", "--methods", "kd"])
    assert code == 2 and capsys.readouterr().err == FP16_OFF_CUDA
