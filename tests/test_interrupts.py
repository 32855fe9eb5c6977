"""An interrupt is an interrupt: Ctrl-C and SIGTERM stop a run resumably with one line (exit
130 and 143), a signal handler's exit stops it too, and a plugin that calls sys.exit() fails
its own cell only."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from kt_bench.commands.main import main
from kt_bench.core import atomic
from kt_bench.core.interrupts import (
    PluginExit,
    Terminated,
    cell_failure,
    is_stop,
    sigterm_as_interrupt,
)
from kt_bench.training.checkpoints import load_plain

from .conftest import SLOW_PLUGIN, rows_by_method, write_tiny_grid

EXITING_PLUGINS = '''
import sys

from kt_bench import register_method
from kt_bench.methods.kd import KD


@register_method("exit_init")
class ExitInInit(KD):
    """Exits while it is built."""

    def __init__(self, weight=None, T=4.0):
        super().__init__(weight, T)
        sys.exit()


@register_method("exit_setup")
class ExitInSetup(KD):
    """Exits in setup."""

    def setup(self, student_shapes, teacher_shapes):
        raise SystemExit(4)


@register_method("exit_loss")
class ExitInLoss(KD):
    """Exits from its loss in the first step."""

    def loss_terms(self, student, teacher, batch):
        sys.exit(3)


@register_method("exit_weights")
class ExitInWeights(KD):
    """Exits from term_weights in its second epoch."""

    def term_weights(self, epoch, epochs):
        if epoch == 1:
            sys.exit("bye")
        return super().term_weights(epoch, epochs)


@register_method("exit_facts")
class ExitInFacts(KD):
    """Trains, then exits when asked for its facts."""

    def facts(self):
        sys.exit(5)
'''

EXITS = {"exit_init": "method 'exit_init' failed to build: it called sys.exit()",
         "exit_setup": "method 'exit_setup' called sys.exit(4)",
         "exit_loss": "method 'exit_loss' called sys.exit(3)",
         "exit_weights": "method 'exit_weights' called sys.exit('bye')",
         "exit_facts": "method 'exit_facts' called sys.exit(5)"}
TIMING = ["wall_s", "images_per_s", "diagnostics_s", "step_s", "cohort_step_s"]


def _plugins(tmp_path: Path, name: str, text: str) -> Path:
    folder = tmp_path / "plugins"
    folder.mkdir(exist_ok=True)
    (folder / f"{name}.py").write_text(textwrap.dedent(text))
    return folder


def test_a_plugin_that_calls_sys_exit_fails_its_own_cell_and_the_rest_go_on(tmp_path, capsys):
    plugins = _plugins(tmp_path, "exits", EXITING_PLUGINS)
    grid = write_tiny_grid(tmp_path, methods=("student", "kd", *EXITS))
    out = tmp_path / "out"
    # unfused: a fused group that loses members mid-run matches the smaller cohort to
    # rounding only (tests/test_fusion.py); unfused it matches it bit for bit
    code = main(["run", "--grid", str(grid), "--out", str(out), "--no-report",
                 "--plugins", str(plugins), "--no-fuse"])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    assert f"{len(EXITS)} cell(s) did not finish ok" in err
    rows = rows_by_method(out)
    for method, error in EXITS.items():
        assert (rows.loc[method, "status"], rows.loc[method, "error"]) == ("failed", error)
    # the others trained exactly as in a cohort without the exiting plugins
    clean = tmp_path / "clean"
    assert main(["run", "--grid", str(grid), "--out", str(clean), "--no-report",
                 "--methods", "student,kd", "--no-fuse"]) == 0
    theirs = rows_by_method(clean).loc[["student", "kd"]]
    same = [c for c in theirs.columns if c not in (*TIMING, "error")]
    pd.testing.assert_frame_equal(rows.loc[["student", "kd"], same], theirs[same],
                                  check_dtype=False)
    assert set(theirs["status"]) == {"ok"}


SIGNALLING_PLUGIN = '''
import os
import signal

from kt_bench import register_method
from kt_bench.methods.kd import KD


@register_method("preempted")
class Preempted(KD):
    """Its first step is where the job gets preempted (a SIGUSR1 to itself)."""

    def loss_terms(self, student, teacher, batch):
        os.kill(os.getpid(), signal.SIGUSR1)
        return super().loss_terms(student, teacher, batch)
'''


def test_an_exit_from_a_signal_handler_stops_the_run_even_inside_plugin_code(tmp_path):
    """submitit exits from its handler of the preemption signal wherever the program is: that
    is a stop of the whole run (resumed by the requeued job), never the plugin's failure."""
    def preempt(signum, frame):
        raise SystemExit(-1)  # as submitit's handler does after requeueing the job

    plugins = _plugins(tmp_path, "preempted", SIGNALLING_PLUGIN)
    grid = write_tiny_grid(tmp_path, methods=("student", "preempted"))
    out = tmp_path / "out"
    previous = signal.signal(signal.SIGUSR1, preempt)
    try:
        with pytest.raises(SystemExit):
            main(["run", "--grid", str(grid), "--out", str(out), "--no-report",
                  "--plugins", str(plugins)])
    finally:
        signal.signal(signal.SIGUSR1, previous)
    logs = [p.read_text() for p in out.glob("cells/*/log.txt")]
    assert len(logs) == 2
    assert all("stopped; a new run resumes from checkpoint.pt" in log for log in logs)
    assert not list(out.glob("cells/*/result.json"))


def test_what_fails_a_cell_and_what_stops_the_run():
    error = ValueError("boom")
    assert cell_failure(error, "method 'x'") is error and not is_stop(error)
    exit_ = cell_failure(SystemExit(2), "method 'x'")
    assert isinstance(exit_, PluginExit) and str(exit_) == "method 'x' called sys.exit(2)"
    for stop in (KeyboardInterrupt(), Terminated(), GeneratorExit()):
        assert is_stop(stop)
        with pytest.raises(type(stop)):
            cell_failure(stop, "method 'x'")


@pytest.mark.parametrize("stop", [KeyboardInterrupt, Terminated])
def test_an_interrupt_during_a_checkpoint_write_stops_the_run_and_keeps_the_old_file(
        tmp_path, monkeypatch, stop):
    """torch.save reports an exception raised in its file's write as a RuntimeError of its
    own; a Ctrl-C that lands there is still a stop, never a checkpoint that cannot be
    written (which would fail the cell)."""
    path = tmp_path / "checkpoint.pt"
    atomic.torch_save(path, {"epoch": 1})
    real_fdopen = os.fdopen

    class Interrupted:
        def __init__(self, fh):
            self.fh, self.writes = fh, 0

        def write(self, data):
            self.writes += 1
            if self.writes == 2:
                raise stop()
            return self.fh.write(data)

        def __getattr__(self, name):
            return getattr(self.fh, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

    monkeypatch.setattr(os, "fdopen", lambda fd, mode: Interrupted(real_fdopen(fd, mode)))
    with pytest.raises(stop):
        atomic.torch_save(path, {"epoch": 2, "weights": torch.zeros(1000)})
    monkeypatch.undo()
    assert load_plain(path) == {"epoch": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]


def test_sigterm_is_an_interrupt_within_the_block_and_the_old_handler_returns_after():
    def mine(signum, frame):
        pass

    previous = signal.signal(signal.SIGTERM, mine)
    try:
        with pytest.raises(Terminated), sigterm_as_interrupt():
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)  # the handler raises at once; never waited for
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, previous)


STOPS = {signal.SIGINT: (130, "kt-bench: interrupted: rerun the same command to resume",
                         "stopped by SIGINT (Ctrl-C); a new run resumes from checkpoint.pt"),
         signal.SIGTERM: (143, "kt-bench: terminated: rerun the same command to resume",
                          "stopped by SIGTERM; a new run resumes from checkpoint.pt")}


@pytest.fixture(scope="module")
def slow_grid(tmp_path_factory):
    """A grid of two cohorts (seeds 0 and 1) of student and slow_kd, its plugins, and the rows
    of an uninterrupted run of it."""
    folder = tmp_path_factory.mktemp("slow")
    plugins = folder / "plugins"
    plugins.mkdir()
    (plugins / "slow.py").write_text(SLOW_PLUGIN)
    grid = write_tiny_grid(folder, methods=("student", "slow_kd"), seeds=(0, 1), epochs=3)
    clean = folder / "clean"
    proc = _run(grid, clean, plugins)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return grid, plugins, _sorted_rows(clean)


def _command(grid: Path, out: Path, plugins: Path) -> list[str]:
    # unfused: these runs are compared with a run in another folder bit for bit (a fused
    # cohort's resume is tested in tests/test_fusion.py)
    return [sys.executable, "-m", "kt_bench", "run", "--grid", str(grid), "--out", str(out),
            "--plugins", str(plugins), "--no-report", "--device", "cpu", "--no-fuse"]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


def _said(stderr: str) -> list[str]:
    """The lines on stderr without the progress bars (which redraw themselves with CR)."""
    segments = (s.strip() for line in stderr.split("\n") for s in line.split("\r"))
    return [s for s in segments if s and "%|" not in s]


def _default_sigint() -> None:
    """As a terminal starts a program: Ctrl-C not ignored (a shell's background job would
    inherit it ignored)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _run(grid: Path, out: Path, plugins: Path) -> subprocess.CompletedProcess:
    return subprocess.run(_command(grid, out, plugins), env=_env(), capture_output=True,
                          text=True, timeout=600)


def _sorted_rows(out: Path) -> pd.DataFrame:
    rows = pd.read_csv(out / "results.csv").drop(columns=TIMING)
    return rows.sort_values("cell_id").reset_index(drop=True)


def _cells_of_seed(out: Path, seed: int) -> list[Path]:
    return [c.parent for c in out.glob("cells/*/config.json")
            if json.loads(c.read_text())["seed"] == seed]


def _wait_for(condition, proc: subprocess.Popen, timeout: float = 300.0) -> None:
    deadline = time.time() + timeout
    while not condition():
        assert proc.poll() is None, "the run ended before it could be stopped"
        assert time.time() < deadline, "the run did not get there in time"
        time.sleep(0.05)


# SIGTERM's run (23 s on 2 cores) is in `pytest -m slow`; its handler is tested above
@pytest.mark.parametrize("signum", [
    pytest.param(s, marks=pytest.mark.slow) if s == signal.SIGTERM else s for s in STOPS],
    ids=lambda s: signal.Signals(s).name)
def test_a_stopped_run_keeps_what_is_done_says_one_line_and_resumes(slow_grid, tmp_path,
                                                                    signum):
    grid, plugins, clean = slow_grid
    code, line, logged = STOPS[signum]
    out = tmp_path / "out"
    proc = subprocess.Popen(_command(grid, out, plugins), env=_env(), text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            preexec_fn=_default_sigint)

    def second_cohort_mid_way() -> bool:
        first, second = _cells_of_seed(out, 0), _cells_of_seed(out, 1)
        return (len(first) == 2 and all((c / "result.json").exists() for c in first)
                and any((c / "log.txt").exists() and " epoch 1:" in (c / "log.txt").read_text()
                        for c in second))

    try:
        _wait_for(second_cohort_mid_way, proc)
        proc.send_signal(signum)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == code, err
    assert _said(err) == [line] and "Traceback" not in err
    done = {c: (c / "result.json").stat().st_mtime_ns for c in _cells_of_seed(out, 0)}
    stopped = _cells_of_seed(out, 1)
    for cell in stopped:
        assert not (cell / "result.json").exists()
        assert logged in (cell / "log.txt").read_text()

    rerun = _run(grid, out, plugins)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert {c: (c / "result.json").stat().st_mtime_ns for c in done} == done  # not run again
    assert any("resuming from" in (c / "log.txt").read_text() for c in stopped)
    pd.testing.assert_frame_equal(_sorted_rows(out), clean)
