"""Safety: nothing is unpickled or eval'd, YAML is read safely, no shell command, no path escapes the repository.

A static scan of the package, the scripts and the rules (cheap, no workflow run), and the checks
that turn a data-ID value, a rerun name or a patch into a path.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from snakedrp.repo.butler import Butler, ButlerError, RerunError
from snakedrp.repo.dataid import DataIdError, patch_in_path

ROOT = Path(__file__).resolve().parents[1]
PYTHON_FILES = sorted([*(ROOT / "snakedrp").rglob("*.py"), *(ROOT / "scripts").glob("*.py"),
                       *(ROOT / "benchmarks").glob("*.py")])
RULE_FILES = sorted([ROOT / "Snakefile", *(ROOT / "rules").glob("*.smk")])
UNSAFE_MODULES = {"pickle", "cPickle", "dill", "shelve", "marshal", "cloudpickle", "joblib"}
UNSAFE_YAML = {"load", "unsafe_load", "full_load", "load_all", "unsafe_load_all", "full_load_all"}


def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node


def test_nothing_is_unpickled_evaluated_or_loaded_as_unsafe_yaml():
    problems = []
    for path in PYTHON_FILES:
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module.split(".")[0]]
            problems += [f"{path.relative_to(ROOT)}:{node.lineno}: imports {n}" for n in names if n in UNSAFE_MODULES]
        for call in _calls(tree):
            f = call.func
            if isinstance(f, ast.Name) and f.id in ("eval", "exec"):
                problems.append(f"{path.relative_to(ROOT)}:{call.lineno}: {f.id}()")
            if (isinstance(f, ast.Attribute) and f.attr in UNSAFE_YAML and isinstance(f.value, ast.Name)
                    and f.value.id == "yaml"):
                loader = [k for k in call.keywords if k.arg == "Loader"]
                if not (loader and "Safe" in ast.unparse(loader[0].value)):
                    problems.append(f"{path.relative_to(ROOT)}:{call.lineno}: yaml.{f.attr} without a safe loader")
    for path in RULE_FILES:
        text = path.read_text()
        problems += [f"{path.relative_to(ROOT)}: {m.group(0).strip()}"
                     for m in re.finditer(r"\b(pickle|yaml\.(?:unsafe_|full_)?load)\b\s*\(", text)]
    assert not problems, "\n".join(problems)


def test_rules_run_scripts_not_shell_commands():
    # a shell: line would put wildcard values (file names) into a command line; every rule runs a
    # script (or nothing), so no value is ever interpreted by a shell
    for path in RULE_FILES:
        for lineno, line in enumerate(path.read_text().splitlines(), 1):
            assert not re.match(r"\s+(shell|run):\s*$", line), f"{path.relative_to(ROOT)}:{lineno}: {line.strip()}"


def test_wildcards_cannot_hold_a_path_separator():
    text = (ROOT / "Snakefile").read_text()
    block = text[text.index("wildcard_constraints:"):]
    constraints = dict(re.findall(r"^\s+(\w+)=r\"([^\"]+)\"", block, re.M))
    assert {"visit", "ccd", "filter", "tract", "patch"} <= set(constraints)
    for name, pattern in constraints.items():
        for bad in ("../x", "a/b", "/abs"):
            assert not re.fullmatch(pattern, bad), (name, pattern, bad)


@pytest.mark.parametrize("dataset, data_id", [
    ("calexp", dict(visit="../../etc", ccd=0, filter="HSC-R")),
    ("flat", dict(ccd=0, filter="HSC-R/../../x")),
    ("calexp", dict(visit=1, ccd="..", filter="HSC-R")),
])
def test_data_id_values_that_would_leave_the_repository_are_refused(tmp_path, dataset, data_id):
    with pytest.raises(ButlerError, match="cannot be part of a path"):
        Butler(tmp_path, rerun="ci").output_path(dataset, **data_id)


@pytest.mark.parametrize("rerun", ["../outside", "/abs", "a/../../b", "a:b:c"])
def test_rerun_names_that_would_leave_the_repository_are_refused(tmp_path, rerun):
    with pytest.raises(RerunError):
        Butler(tmp_path, rerun=rerun)
    assert not (tmp_path.parent / "outside").exists()


def test_patch_must_be_two_integers_before_it_becomes_a_path():
    assert patch_in_path("3,4") == "3_4"
    for bad in ("../1,2", "1,2/..", "1;2", "a,b"):
        with pytest.raises(DataIdError):
            patch_in_path(bad)
