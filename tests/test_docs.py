"""The README against the code: statements that would otherwise drift are checked here.

- the method table: a row for every built-in method, none for an unknown one, and the default
  weight and option defaults it states equal the registered class's;
- the result columns it lists equal the columns a run writes;
- its first screen holds two commands, the second being the one ``.ci/run`` runs;
- every repository path it names exists.
"""

from __future__ import annotations

import inspect
import math
import re
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from kt_bench.api.method import METHODS, Method
from kt_bench.sweep import rows

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the tomli backport, a dependency on 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
CI_SCRIPT = ROOT / ".ci" / "run"
BUILTIN_PACKAGE = "kt_bench.methods"

#: The method table's header cells this test reads (others may come and go).
NAME_COLUMN = "name"
WEIGHT_COLUMN = "default weight"
DEFAULTS_COLUMN = "other defaults"
#: What the weight column says for a method without a weighted term of its own.
NO_WEIGHT = "—"


def readme() -> str:
    """The README's text."""
    return README.read_text(encoding="utf-8")


def section(text: str, title: str) -> str:
    """The body of the ``## title`` section of ``text`` (up to the next ``## `` heading)."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", text, re.M | re.S)
    assert match, f"README has no '## {title}' section"
    return match.group(1)


def table_cells(line: str) -> list[str]:
    """The cells of one markdown table row; ``\\|`` inside a cell is a literal bar."""
    inner = line.strip()
    inner = inner[1:] if inner.startswith("|") else inner
    inner = inner[:-1] if inner.endswith("|") and not inner.endswith("\\|") else inner
    return [cell.strip().replace("\\|", "|") for cell in re.split(r"(?<!\\)\|", inner)]


def find_table(text: str, header: tuple[str, ...]) -> list[dict[str, str]]:
    """The rows of the first markdown table in ``text`` whose header row begins with the
    cells ``header`` (each matched as the start of a header cell), as dicts keyed by the
    header cells."""
    lines = text.splitlines()
    for i, line in enumerate(lines):
        if not line.lstrip().startswith("|"):
            continue
        cells = table_cells(line)
        if len(cells) < len(header) or not all(
                cell.lower().startswith(want) for cell, want in zip(cells, header, strict=False)):
            continue
        assert i + 1 < len(lines) and set(lines[i + 1].replace("|", "").strip()) <= set("-: "), \
            f"README: the table headed {line!r} has no separator row"
        body = []
        for row_line in lines[i + 2:]:
            if not row_line.lstrip().startswith("|"):
                break
            row = table_cells(row_line)
            assert len(row) == len(cells), f"README: table row with {len(row)} cells, " \
                                           f"{len(cells)} expected: {row_line!r}"
            body.append(dict(zip(cells, row, strict=True)))
        return body
    raise AssertionError(f"README has no table headed {' | '.join(header)} ...")


def column(row: dict[str, str], prefix: str) -> str:
    """The cell of ``row`` under the header that starts with ``prefix``."""
    keys = [k for k in row if k.lower().startswith(prefix)]
    assert len(keys) == 1, f"README method table: no single column '{prefix}...' in {list(row)}"
    return row[keys[0]]


def code_spans(text: str) -> list[str]:
    """The contents of the inline code spans of ``text``."""
    return re.findall(r"`([^`]+)`", text)


def method_rows() -> dict[str, dict[str, str]]:
    """The README's method table, by method name (the name cell's code span)."""
    table = find_table(section(readme(), "Methods"), (NAME_COLUMN, "what", WEIGHT_COLUMN))
    by_name: dict[str, dict[str, str]] = {}
    for row in table:
        names = code_spans(column(row, NAME_COLUMN))
        assert len(names) == 1, f"README method table: a name cell without one `name`: {row}"
        assert names[0] not in by_name, f"README method table: '{names[0]}' twice"
        by_name[names[0]] = row
    return by_name


def builtin_methods() -> dict[str, type[Method]]:
    """The registered methods that come from the built-in plugins (``methods/``)."""
    return {name: METHODS.get(name) for name in METHODS.names()
            if METHODS.get(name).__module__.startswith(BUILTIN_PACKAGE + ".")}


def plain(value: Any) -> Any:
    """``value`` as TOML would spell it: tuples as lists."""
    if isinstance(value, (tuple, list)):
        return [plain(v) for v in value]
    return value


def same(stated: Any, actual: Any) -> bool:
    """Whether the README's ``stated`` value is the code's ``actual`` one (numbers by value,
    so ``4`` states ``4.0``; a bool is no number)."""
    if isinstance(stated, list) and isinstance(actual, list):
        return len(stated) == len(actual) and all(map(same, stated, actual))
    numbers = all(isinstance(v, (int, float)) and not isinstance(v, bool)
                  for v in (stated, actual))
    if numbers:
        return math.isclose(stated, actual, rel_tol=1e-12, abs_tol=0.0)
    return type(stated) is type(actual) and stated == actual


def test_method_table_has_a_row_for_every_builtin_method():
    """Every built-in method is in the README's method table."""
    builtins = builtin_methods()
    assert len(builtins) >= 20, f"the built-in plugins did not load: {sorted(builtins)}"
    missing = sorted(set(builtins) - set(method_rows()))
    assert not missing, f"README method table lacks registered methods: {missing}"


def test_method_table_names_only_registered_methods():
    """Every row of the README's method table names a registered method."""
    unknown = sorted(set(method_rows()) - set(METHODS.names()))
    assert not unknown, f"README method table names unregistered methods: {unknown}"


def test_method_table_states_each_default_weight():
    """The table's default weight is the class's ``default_weight`` (``—``: none, 0)."""
    builtins = builtin_methods()
    for name, row in method_rows().items():
        cell = column(row, WEIGHT_COLUMN)
        weight = builtins[name].default_weight
        if cell == NO_WEIGHT:
            assert weight == 0, f"README: '{name}' has no default weight, the code {weight}"
            continue
        match = re.match(r"\s*([0-9]+(?:\.[0-9]+)?(?:e[+-]?[0-9]+)?)", cell)
        assert match, f"README: '{name}' default weight {cell!r} does not start with a number"
        assert same(float(match.group(1)), float(weight)), \
            f"README: '{name}' default weight {match.group(1)}, the code's {weight}"


def test_method_table_states_each_option_default():
    """Each ``key = value`` the table states as a default is the constructor's default for
    that option (``ce_weight``: the class's ``default_ce_weight``)."""
    builtins = builtin_methods()
    for name, row in method_rows().items():
        cls = builtins[name]
        params = inspect.signature(cls.__init__).parameters
        cell = column(row, DEFAULTS_COLUMN)
        spans = code_spans(cell)
        assert spans or cell == NO_WEIGHT, f"README: '{name}' defaults cell {cell!r} states " \
                                           "none in `key = value` form"
        for span in spans:
            try:
                stated = tomllib.loads(span)
            except tomllib.TOMLDecodeError:
                pytest.fail(f"README: '{name}' default `{span}` is not `key = value` (TOML)")
            assert len(stated) == 1, f"README: '{name}' default `{span}` is not one option"
            ((key, value),) = stated.items()
            if key == "ce_weight":
                actual = cls.default_ce_weight
            else:
                assert key in params and key != "self", \
                    f"README: '{name}' states a default for `{key}`, which it does not take"
                actual = params[key].default
                assert actual is not inspect.Parameter.empty, \
                    f"README: '{name}' states a default for `{key}`, which has none"
            assert actual is not None and same(value, plain(actual)), \
                f"README: '{name}' default `{span}`, the code's {key} = {actual!r}"


def result_columns_paragraph() -> str:
    """The README paragraph that lists the result columns."""
    match = re.search(r"^Result columns\b.*?(?=\n\n|\Z)", readme(), re.M | re.S)
    assert match, "README has no paragraph beginning 'Result columns'"
    return match.group(0)


def readme_result_columns() -> tuple[list[str], set[str], list[str]]:
    """What the README lists: the leading columns in order, every column it names (the
    comma-separated code spans, and single names in a later 'then ...' list), and the
    patterns of the per-option and per-fact columns (spans with ``<...>``)."""
    paragraph = result_columns_paragraph()
    spans = code_spans(paragraph)
    lists = [[c.strip() for c in s.split(",")] for s in spans if "," in s]
    assert lists, "README's result columns paragraph lists no columns"
    leading = lists[0]
    then = paragraph.split("; then", 1)
    assert len(then) == 2, "README's result columns paragraph has no '; then' list"
    later = then[1].split("`status` is", 1)[0]  # what follows names statuses, not columns
    named = set(leading)
    patterns = []
    for span in code_spans(later):
        if "<" in span:
            patterns.append(span)
        elif re.fullmatch(r"[a-z][a-z0-9_]*", span):
            named.add(span)
    return leading, named, patterns


def pattern_regex(pattern: str) -> re.Pattern[str]:
    """``<method>.<option>`` and the like as a regex: ``<method>`` is a registered method's
    name, any other ``<...>`` a name without dots."""
    methods = "|".join(re.escape(m) for m in sorted(METHODS.names(), key=len, reverse=True))
    parts = re.split(r"(<[^>]+>)", pattern)
    regex = "".join(f"(?:{methods})" if p == "<method>" else r"[A-Za-z0-9_]+" if p.startswith("<")
                    else re.escape(p) for p in parts)
    return re.compile(regex)


def test_result_columns_lead_as_rows_py_defines():
    """The README's leading result columns are ``rows.RESULT_COLUMNS``, in order."""
    leading, _, _ = readme_result_columns()
    assert leading == rows.RESULT_COLUMNS, \
        f"README lists the leading result columns {leading}, rows.py {rows.RESULT_COLUMNS}"


def test_result_columns_are_the_columns_a_run_writes(finished, tmp_path):
    """The columns the README names are those of a finished run's ``results.csv`` plus
    those of a cell whose teacher is a file; its patterns match the swept-value columns."""
    from kt_bench.sweep.cells import expand
    from kt_bench.sweep.config import load_grid

    _, out = finished
    written = list(pd.read_csv(out / "results.csv", nrows=0).columns)
    _, named, patterns = readme_result_columns()
    regexes = [pattern_regex(p) for p in patterns]

    def dynamic(col: str) -> bool:
        return col not in named and any(r.fullmatch(col) for r in regexes)

    # a cell planned with a teacher file and a swept option: its identity columns (training
    # it would add nothing the finished run lacks)
    grid_file, _ = finished
    teacher_file = tmp_path / "teacher.pt"
    teacher_file.write_bytes(b"not trained: only hashed when the cells are planned")
    swept = tmp_path / "swept.toml"
    swept.write_text(grid_file.read_text() + '\n[sweep]\n"kd.T" = [2.0, 4.0]\n')
    cell = next(c for c in expand(load_grid(str(swept)), "no", str(teacher_file))
                if c.method == "kd")
    planned = list(cell.identity())
    assert any(dynamic(c) for c in planned), \
        f"no README pattern ({patterns}) matches the swept column among {planned}"

    expected = {c for c in [*written, *planned] if not dynamic(c)}
    assert not named - expected, \
        f"README names result columns a run does not write: {sorted(named - expected)}"
    assert not expected - named, \
        f"a run writes result columns the README does not name: {sorted(expected - named)}"


def first_screen() -> str:
    """The README up to its first horizontal rule or ``##`` section."""
    match = re.search(r"^(?:---+|## )", readme(), re.M)
    assert match, "README has no rule or section after its first screen"
    return readme()[:match.start()]


def test_first_screen_has_two_commands_and_ci_runs_the_test_one():
    """The first screen holds exactly two commands, an install+run one and an install+test
    one, and every step of the test one is a line of ``.ci/run`` (pytest last)."""
    blocks = re.findall(r"^```[a-z]*\n(.*?)^```", first_screen(), re.M | re.S)
    assert len(blocks) == 2, f"README's first screen holds {len(blocks)} code blocks, not 2"
    commands = [b.strip() for b in blocks]
    assert all("\n" not in c for c in commands), f"a first-screen block is not one command: " \
                                                 f"{commands}"
    run, test = commands
    run_steps = [s.strip() for s in run.split("&&")]
    assert any(re.search(r"\bpip install \.(\s|$)", s) for s in run_steps), run
    assert re.search(r"\bkt-bench run\b", run_steps[-1]), run
    test_steps = [s.strip() for s in test.split("&&")]
    assert re.search(r"\bpip install -e '\.\[test\]'", test), test
    assert re.fullmatch(r"\S*python -m pytest", test_steps[-1]), \
        f"README's test command does not end in `python -m pytest`: {test}"
    ci_lines = [line.strip() for line in CI_SCRIPT.read_text().splitlines()]
    at = [ci_lines.index(s) if s in ci_lines else -1 for s in test_steps]
    assert -1 not in at, f".ci/run does not run README's test command steps " \
                         f"{[s for s, i in zip(test_steps, at, strict=True) if i < 0]}"
    assert at == sorted(at), ".ci/run runs README's test command steps in another order"


def test_every_repository_path_named_exists():
    """Each path under ``kt_bench/``, ``methods/``, ``tests/`` or ``.ci/`` the README names
    exists (``<name>`` placeholders and ``*`` match any file)."""
    text = readme()
    paths = set(re.findall(r"(?<![\w./<>-])((?:kt_bench|methods|tests|\.ci)/[\w<>*./-]*)", text))
    missing = []
    for path in sorted(paths):
        path = path.rstrip(".,")
        pattern = re.sub(r"<[^>]+>", "*", path).rstrip("/")
        if not list(ROOT.glob(pattern)):
            missing.append(path)
    assert not missing, f"README names paths that do not exist: {missing}"
