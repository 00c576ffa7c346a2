"""The conda environment file declares the same dependencies as pyproject.toml."""
import re
import tomllib
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~ \[]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def test_conda_env_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    pip_names = {_name(r) for r in project["dependencies"]}
    env = yaml.safe_load((ROOT / "envs" / "snakedrp.yaml").read_text())
    conda_names = {_name(d) for d in env["dependencies"] if isinstance(d, str)} - {"python", "pip"}
    assert conda_names == pip_names


def test_package_never_imports_snakemake():
    offenders = [p.name for p in (ROOT / "snakedrp").rglob("*.py")
                 if re.search(r"^\s*(import|from)\s+snakemake\b", p.read_text(), re.M)]
    assert offenders == []
