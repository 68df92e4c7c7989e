"""The test command installs everything the suite reads. A file that only `scripts/train.sh`, a
benchmark or a manual step put on this machine passes here and fails on a new one, so these
tests check the sources of what the suite uses, not only that it is present:
- every system file that the suite, the package or a shipped config names belongs to a Debian
  package in scripts/debian-packages.txt, the list scripts/test.sh installs;
- every third-party module imported anywhere in the repository comes from a distribution that
  pyproject.toml declares (a dependency or one of the extras scripts/setup.sh installs), not one
  that happens to arrive with another package."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tomllib
import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGES_FILE = ROOT / "scripts" / "debian-packages.txt"
SYSTEM_PATH = re.compile(r"/usr/share/[\w./+-]+")


def data_packages() -> set[str]:
    return {line.split("#")[0].strip() for line in PACKAGES_FILE.read_text().splitlines()} - {""}


def system_paths() -> dict[str, str]:
    """Every /usr/share/... path named in the package, the tests, train.py and the shipped configs
    (YAML values, comments left out), with the file that names it."""
    found = {}
    for path in [*ROOT.glob("distributed_cl/**/*.py"), *ROOT.glob("tests/**/*.py"), ROOT / "train.py"]:
        if path.name != Path(__file__).name:
            for match in SYSTEM_PATH.findall(path.read_text()):
                found.setdefault(match.rstrip("."), str(path.relative_to(ROOT)))
    for path in [*ROOT.glob("experiments/**/*.yaml"), *ROOT.glob("tests/configs/*.yaml")]:
        for match in SYSTEM_PATH.findall(yaml.safe_dump(yaml.safe_load(path.read_text()))):
            found.setdefault(match.rstrip("."), str(path.relative_to(ROOT)))
    return found


def test_both_readme_commands_install_the_one_package_list():
    assert data_packages() >= {"dataset-fashion-mnist", "wordnet-base", "fonts-noto-color-emoji", "unicode-data"}
    for script in ("test.sh", "train.sh"):
        assert re.search(r"^need_data_packages\b", (ROOT / "scripts" / script).read_text(), re.M), script


@pytest.mark.skipif(shutil.which("dpkg-query") is None, reason="not a Debian system: no dpkg to ask")
def test_every_system_file_comes_from_a_package_the_test_command_installs():
    paths = system_paths()
    assert "/usr/share/datasets/fashion-mnist" in paths  # the scan sees the shipped configs
    owners = {}
    for path, named_in in paths.items():
        # a directory is owned by every package with files in it; a path under a package's
        # directory that is written later (caches) would be owned by none: check its parent
        probe = path if Path(path).exists() else str(Path(path).parent)
        out = subprocess.run(["dpkg-query", "-S", probe], capture_output=True, text=True).stdout
        owners[path] = ({p.strip() for line in out.splitlines() for p in line.split(":")[0].split(",")}, named_in)
    missing = {path: (named_in, sorted(pkgs)) for path, (pkgs, named_in) in owners.items()
               if not pkgs & data_packages()}
    assert not missing, f"system files whose package scripts/test.sh does not install (path: file, owners): {missing}"


def imported_modules() -> dict[str, str]:
    """Top-level modules imported by any Python file in the repository, with a file that imports it."""
    local = {"distributed_cl", "train", "experiments", *(p.stem for p in ROOT.glob("tests/*.py")),
             *(p.stem for p in ROOT.glob("experiments/*.py"))}
    found = {}
    for path in [*ROOT.glob("distributed_cl/**/*.py"), *ROOT.glob("tests/**/*.py"),
                 *ROOT.glob("experiments/**/*.py"), ROOT / "train.py"]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                top = name.split(".")[0]
                if top not in local and top not in sys.stdlib_module_names:
                    found.setdefault(top, str(path.relative_to(ROOT)))
    return found


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared_distributions() -> set[str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    requirements = [*project["dependencies"], *(r for extra in project["optional-dependencies"].values() for r in extra)]
    return {canonical(re.match(r"[A-Za-z0-9_.-]+", r)[0]) for r in requirements}


def test_every_imported_module_comes_from_a_declared_distribution():
    modules = imported_modules()
    assert {"torch", "ray", "yaml"} <= set(modules)  # the scan sees the imports
    providers = importlib.metadata.packages_distributions()
    undeclared = {module: (named_in, providers.get(module)) for module, named_in in modules.items()
                  if not {canonical(d) for d in providers.get(module, [])} & declared_distributions()}
    assert not undeclared, f"imports whose distribution pyproject.toml does not declare (module: file, providers): {undeclared}"
