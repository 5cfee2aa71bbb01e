"""constraints.txt: well formed, inside pyproject.toml's ranges, and (where the environment was installed with it, as
.ci/run does and says with REWRITER_PINNED=1) equal to what is installed, covering every installed dependency.

On a machine that installs its own torch (a GPU box: `pip install -e ".[triton]"`) the installed versions are not
the pins; there the last two tests skip, saying why."""
from __future__ import annotations

import os
import re
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
PINNED = os.environ.get("REWRITER_PINNED") == "1"
not_pinned_env = pytest.mark.skipif(
    not PINNED, reason="this environment was not installed with constraints.txt (.ci/run sets REWRITER_PINNED=1)")


def pins() -> dict[str, Version]:
    out = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([0-9][^\s;+]*)", line)
        assert m, f"constraints.txt: not a `name==version` pin: {line!r}"
        name = canonicalize_name(m.group(1))
        assert name not in out, f"constraints.txt pins {name} twice"
        out[name] = Version(m.group(2))
    return out


def project_requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = list(project["dependencies"])
    for extra in project["optional-dependencies"].values():
        reqs += extra
    return [Requirement(r) for r in reqs]


def test_constraints_pin_every_direct_dependency_inside_the_declared_ranges():
    pinned = pins()
    assert "torch" in pinned and "triton" in pinned
    for req in project_requirements():
        name = canonicalize_name(req.name)
        assert name in pinned, f"{req.name} (pyproject.toml) has no pin in constraints.txt"
        assert req.specifier.contains(pinned[name], prereleases=True), \
            f"constraints.txt pins {name}=={pinned[name]}, outside pyproject.toml's {req}"


def _installed(name: str) -> Version | None:
    try:
        return Version(metadata.version(name))
    except metadata.PackageNotFoundError:
        return None


@not_pinned_env
def test_installed_versions_equal_the_pins():
    drift = {}
    for name, version in pins().items():
        have = _installed(name)
        # a local label (torch 2.13.0+cpu) is the build, not the release: the pin is on the release
        if have is None or Version(have.public) != version:
            drift[name] = f"pinned {version}, installed {have}"
    assert not drift, f"installed versions differ from constraints.txt: {drift}"


@not_pinned_env
def test_every_installed_dependency_is_pinned():
    """The closure of rewriter[dev]'s requirements (as installed) is in constraints.txt: a new transitive dependency
    that the pins do not name would float."""
    pinned = pins()
    env = default_environment()
    seen, todo, missing = set(), [("rewriter", frozenset({"dev", "onnx", "triton"}))], []
    while todo:
        name, extras = todo.pop()
        dist = metadata.distribution(name)
        for text in dist.requires or []:
            req = Requirement(text)
            if req.marker and not any(req.marker.evaluate({**env, "extra": e}) for e in (extras or {""})):
                continue
            dep = canonicalize_name(req.name)
            if (dep, frozenset(req.extras)) in seen:
                continue
            seen.add((dep, frozenset(req.extras)))
            if dep not in pinned:
                missing.append(f"{dep} (needed by {name})")
            if _installed(req.name) is not None:
                todo.append((req.name, frozenset(req.extras)))
    assert not missing, f"installed dependencies without a pin in constraints.txt: {sorted(set(missing))}"
