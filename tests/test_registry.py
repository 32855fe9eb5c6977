"""The registry, the method combinations and plugin discovery from all three sources."""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path

import pytest
import torch

from kt_bench.errors import ConfigError, PluginError, UnknownNameError
from kt_bench.method import METHODS, CombinedMethod, build_method
from kt_bench.plugins import load_entry_points, load_plugin_dir, load_plugins
from kt_bench.registry import Registry

BUILTIN = ["ab", "at", "cc", "crd", "dist", "dkd", "fitnet", "fsp", "ft", "kd", "kd_ls",
           "nst_gauss", "nst_linear", "nst_poly", "ofd", "pkt", "reviewkd", "rkd", "sp", "student",
           "vid"]

PLUGIN = '''
import torch
from kt_bench import Method, register_method

@register_method("{name}")
class Plugged(Method):
    """A test plugin: the squared mean difference of the logits."""
    default_weight = 2.0

    def __init__(self, weight=None):
        super().__init__(weight)
        self.taps = ("logits",)

    def loss_terms(self, student, teacher):
        return {{self.name: (student["logits"] - teacher["logits"]).mean() ** 2}}
'''


def write_plugin(folder: Path, filename: str, name: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / filename
    path.write_text(PLUGIN.format(name=name))
    return path


def test_registry_lookup_and_unknown_name_lists_known_names():
    reg: Registry[int] = Registry("widget")
    reg.register("alpha", 1, origin="a.py")
    reg.register("beta", 2, origin="b.py")
    assert reg.get("beta") == 2 and reg.names() == ["alpha", "beta"]
    with pytest.raises(UnknownNameError) as exc:
        reg.get("alpah")
    msg = str(exc.value)
    assert msg == "unknown widget 'alpah' (did you mean 'alpha'?); known: alpha, beta"
    assert "\n" not in msg


def test_registry_duplicate_name_names_both_files():
    reg: Registry[int] = Registry("widget")
    reg.register("alpha", 1, origin="/x/a.py")
    with pytest.raises(PluginError, match=r"duplicate widget name 'alpha': defined in /x/a.py "
                                          r"and again in /y/b.py"):
        reg.register("alpha", 2, origin="/y/b.py")


def test_builtin_methods_are_found_in_the_methods_folder():
    load_plugins()
    assert set(BUILTIN) <= set(METHODS.names())
    assert Path(METHODS.origin("nst_poly")).name == "nst.py"
    assert Path(METHODS.origin("kd")).parent.name == "methods"


def test_plugin_folder_registers_methods(tmp_path):
    write_plugin(tmp_path / "plugs", "mine.py", "mine")
    load_plugins([tmp_path / "plugs"])
    method = build_method("mine")
    assert method.weight == 2.0 and method.taps == ("logits",)
    s, t = torch.zeros(2, 3), torch.ones(2, 3)
    assert method.loss_terms({"logits": s}, {"logits": t})["mine"].item() == pytest.approx(1.0)


def test_plugin_folder_from_environment_variable(tmp_path, monkeypatch):
    write_plugin(tmp_path / "env_plugs", "from_env.py", "from_env")
    monkeypatch.setenv("KT_BENCH_PLUGINS", str(tmp_path / "env_plugs"))
    load_plugins()
    assert "from_env" in METHODS


def _fake_distribution(site: Path, dist: str, entry: str, module: str, code: str) -> None:
    (site / f"{module}.py").write_text(textwrap.dedent(code))
    info = site / f"{dist}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[kt_bench.methods]\n{entry}\n")


def test_entry_points_register_classes_and_modules(tmp_path, monkeypatch):
    site = tmp_path / "site"
    site.mkdir()
    _fake_distribution(site, "kt_ep_class", "ep_class = kt_ep_class_mod:EPMethod",
                       "kt_ep_class_mod", """
        from kt_bench import Method

        class EPMethod(Method):
            '''Registered by its entry point's name.'''
            default_weight = 3.0
        """)
    _fake_distribution(site, "kt_ep_module", "ep_module = kt_ep_module_mod", "kt_ep_module_mod",
                       PLUGIN.format(name="ep_self_registered"))
    monkeypatch.syspath_prepend(str(site))
    load_entry_points()
    assert build_method("ep_class").weight == 3.0
    assert "ep_self_registered" in METHODS
    for mod in ("kt_ep_class_mod", "kt_ep_module_mod"):
        sys.modules.pop(mod, None)


def test_entry_point_that_fails_to_load_is_one_line(tmp_path, monkeypatch):
    site = tmp_path / "site"
    site.mkdir()
    _fake_distribution(site, "kt_ep_broken", "broken = kt_ep_broken_mod:Missing",
                       "kt_ep_broken_mod", "x = 1\n")
    monkeypatch.syspath_prepend(str(site))
    with pytest.raises(PluginError, match="entry point 'broken = kt_ep_broken_mod:Missing'"):
        load_entry_points()
    sys.modules.pop("kt_ep_broken_mod", None)


def test_duplicate_plugin_name_is_an_error_naming_both_files(tmp_path):
    write_plugin(tmp_path / "a", "one.py", "twin")
    second = write_plugin(tmp_path / "b", "two.py", "twin")
    load_plugin_dir(tmp_path / "a")
    with pytest.raises(PluginError) as exc:
        load_plugin_dir(tmp_path / "b")
    msg = str(exc.value)
    assert "duplicate method name 'twin'" in msg
    assert str(tmp_path / "a" / "one.py") in msg and str(second) in msg


def test_plugin_shadowing_a_builtin_is_an_error(tmp_path):
    write_plugin(tmp_path, "kd_again.py", "kd")
    with pytest.raises(PluginError, match=r"duplicate method name 'kd': defined in .*kd\.py"):
        load_plugin_dir(tmp_path)


def test_plugin_that_fails_to_import_names_the_file(tmp_path):
    bad = tmp_path / "broken.py"
    bad.write_text("import no_such_module_anywhere\n")
    with pytest.raises(PluginError) as exc:
        load_plugin_dir(tmp_path)
    assert str(exc.value) == (f"plugin {bad} failed to import: ModuleNotFoundError: "
                              "No module named 'no_such_module_anywhere'")


def test_missing_plugin_folder_is_an_error(tmp_path):
    with pytest.raises(PluginError, match="does not exist"):
        load_plugin_dir(tmp_path / "nope")


def test_unknown_method_lists_known_methods():
    with pytest.raises(UnknownNameError) as exc:
        build_method("kd+nst_cubic")
    assert str(exc.value).startswith("unknown method 'nst_cubic'")
    assert "known: " + ", ".join(BUILTIN) in str(exc.value)


def test_unknown_method_option_lists_accepted_options():
    with pytest.raises(ConfigError, match=r"unknown option 'temperature' for method 'kd'; "
                                          r"accepted: weight, T"):
        build_method("kd", {"kd": {"temperature": 2}})


def test_combination_sums_members_terms_with_their_own_weights():
    method = build_method("kd+nst_poly", {"nst_poly": {"weight": 10.0}, "kd": {"T": 2.0}})
    assert isinstance(method, CombinedMethod)
    assert method.taps == ("logits", "feat")
    assert method.term_weights(0, 10) == {"kd": 1.0, "nst_poly": 10.0}
    taps_s = {"logits": torch.randn(4, 5), "feat": torch.randn(4, 3, 2, 2)}
    taps_t = {"logits": torch.randn(4, 5), "feat": torch.randn(4, 6, 2, 2)}
    terms = method.loss_terms(taps_s, taps_t)
    kd = build_method("kd", {"kd": {"T": 2.0}}).loss_terms(taps_s, taps_t)["kd"]
    nst = build_method("nst_poly").loss_terms(taps_s, taps_t)["nst_poly"]
    assert terms["kd"].item() == pytest.approx(kd.item())
    assert terms["nst_poly"].item() == pytest.approx(nst.item())
    assert method.describe()["kd"]["T"] == 2.0


def test_combination_naming_a_member_twice_is_an_error():
    with pytest.raises(ConfigError, match="names a member twice"):
        build_method("kd+kd")


def test_fitnet_two_stage_is_declared_by_the_plugin():
    one = build_method("fitnet")
    assert one.term_weights(0, 10) == {"fitnet": 100.0} and one.ce_scale(0, 10) == 1.0
    two = build_method("fitnet", {"fitnet": {"hint_epochs": 3}})
    assert two.taps == ("stage2", "logits")
    assert two.term_weights(2, 10) == {"fitnet": 100.0, "fitnet.kd": 0.0}
    assert two.ce_scale(2, 10) == 0.0
    assert two.term_weights(3, 10) == {"fitnet": 0.0, "fitnet.kd": 1.0}
    assert two.ce_scale(3, 10) == 1.0
