"""A fresh install works from the repository root: no file of ours hides a package a dependency needs.

Python puts the folder of the script it runs (or the current folder, for `python -c` and `-m`) first on its import
path, so a file `NAME.py` at the root of this repository is what `import NAME` finds, even inside transformers or
diffusers. One such clash (a module of ours named like Hugging Face's `kernels`, which transformers imports) once
broke every Wan command and these tests on a fresh machine.
"""

import re
import subprocess
import sys
from importlib import metadata

import pytest
from conftest import ROOT


def our_import_names(root=ROOT):
    """{import name: the file or folder of ours that `import name` would find first}: every top-level .py file
    and every top-level folder with an __init__.py (a folder without one loses to any installed package)."""
    names = {p.stem: p.name for p in root.glob("*.py")}
    names.update({p.parent.name: p.parent.name + "/" for p in root.glob("*/__init__.py")})
    return names


def _canonical(name):
    return re.sub(r"[-_.]+", "-", name).lower()


def who_needs(distribution):
    """The other installed distributions that require `distribution` (not only for an extra), sorted."""
    wanted, needers = _canonical(distribution), set()
    for dist in metadata.distributions():
        for requirement in dist.requires or ():
            name = _canonical(re.match(r"[A-Za-z0-9_.-]+", requirement).group())
            if name == wanted != _canonical(dist.metadata["Name"]) and "extra ==" not in requirement:
                needers.add(dist.metadata["Name"])
    return sorted(needers)


def shadowing(root=ROOT):
    """One line per file of ours that hides an installed distribution's module of the same import name."""
    installed = metadata.packages_distributions()      # {top-level import name: [distribution names]}
    lines = []
    for name, ours in sorted(our_import_names(root).items()):
        for dist in installed.get(name, ()):
            needed = who_needs(dist)
            by = f", needed by {', '.join(needed)}" if needed else ""
            lines.append(f"{ours} shadows the installed package {name} (from {dist} "
                         f"{metadata.version(dist)}{by}): rename ours")
    return lines


def test_no_module_of_ours_shares_its_import_name_with_an_installed_package():
    clashes = shadowing()
    assert not clashes, "\n".join(clashes)


def test_the_guard_names_a_file_that_shadows_an_installed_package(tmp_path):
    """The guard itself: a root holding `pytest.py` (pytest is installed here, so its name is taken) is caught,
    and the line names both sides; a root with only our usual names is not."""
    (tmp_path / "rf.py").write_text("")
    assert shadowing(tmp_path) == []
    (tmp_path / "pytest.py").write_text("")
    (tmp_path / "_pytest").mkdir()
    (tmp_path / "_pytest" / "__init__.py").write_text("")
    lines = shadowing(tmp_path)
    assert len(lines) == 2, lines
    assert lines[0].startswith("_pytest/ shadows the installed package _pytest (from pytest ")
    assert lines[1].startswith("pytest.py shadows the installed package pytest (from pytest ")


@pytest.mark.slow
def test_the_wan_packages_import_from_the_repository_root():
    """What a user runs: from the root, wan.py's own imports of transformers and diffusers, in a new process (so
    the root is first on the import path, as for `python sample.py`)."""
    code = ("import wan; transformers = wan._need('transformers'); diffusers = wan._need('diffusers'); "
            "transformers.UMT5EncoderModel; diffusers.AutoencoderKLWan; "
            "from diffusers import WanTransformer3DModel; print('ok')")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_the_constraints_pin_every_requirement():
    """constraints.txt (the versions of the last green CI run) pins each package the two requirements files name."""
    def names(path, pinned=False):
        rows = [line.split("#")[0].strip() for line in (ROOT / path).read_text().splitlines()]
        rows = [r for r in rows if r and not r.startswith("-")]
        assert not pinned or all("==" in r for r in rows), f"{path}: every row pins one version (NAME==VERSION)"
        return {_canonical(re.match(r"[A-Za-z0-9_.-]+", r).group()) for r in rows}
    wanted = names("requirements.txt") | names("tests/requirements.txt")
    missing = wanted - names("constraints.txt", pinned=True)
    assert not missing, f"constraints.txt does not pin {sorted(missing)}: rebuild it from a green run's pip freeze"
