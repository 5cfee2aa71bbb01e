"""Move the pins forward: re-resolve every dependency to its newest release, run the tests, rewrite constraints.txt.

    python tools/update_pins.py                 # the whole suite (what CI runs)
    python tools/update_pins.py -- tests/test_kernels_attention.py   # pytest arguments after --

Steps: a fresh virtual environment in a temporary folder; `pip install -r requirements-dev.txt` there WITHOUT the
constraints (so pip picks the newest releases that pyproject.toml's ranges allow; torch stays the CPU build that
requirements-dev.txt names: moving torch is a deliberate edit of that file); the tests with that environment's
python; and only when they pass, constraints.txt is rewritten from `pip freeze` of that environment (every direct and
transitive dependency, `==` pins). When they fail, constraints.txt is left as it is and the exit status is pytest's.
The temporary environment is removed afterwards (--keep leaves it). Run it from any folder; it works on the checkout
it lives in. Review the diff of constraints.txt and commit it.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONSTRAINTS = ROOT / "constraints.txt"
HEADER = """\
# Every direct and transitive dependency of `pip install -r requirements-dev.txt`, pinned to the versions that the
# test suite last passed with (in a fresh virtual environment). Used by the README's test command and .ci/run:
#     pip install -q -c constraints.txt -r requirements-dev.txt && python -m pytest -q
# Do not edit by hand: `python tools/update_pins.py` re-resolves to the newest releases, runs the tests and rewrites
# this file when they pass. tests/test_pins.py checks that an environment installed with it matches it.
# torch is pinned without its local label (+cpu): requirements-dev.txt takes the CPU build.
"""


def run(cmd: list[str], env: dict, **kw) -> subprocess.CompletedProcess:
    print("+", " ".join(cmd), flush=True)
    return subprocess.run(cmd, env=env, cwd=ROOT, **kw)


def freeze(python: Path, env: dict) -> list[str]:
    # --all: setuptools is a runtime dependency (torch requires it); pip itself is the installer, not pinned
    out = subprocess.run([str(python), "-m", "pip", "freeze", "--all", "--exclude-editable", "--exclude", "pip"],
                         env=env, cwd=ROOT, check=True, capture_output=True, text=True).stdout
    pins = []
    for line in out.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^\s;]+)", line)
        if not m:
            raise SystemExit(f"unexpected `pip freeze` line (not name==version): {line!r}")
        name, version = m.groups()
        pins.append(f"{name}=={version.split('+')[0]}")
    return sorted(pins, key=str.lower)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    pytest_args = ["-q"]
    if "--" in argv:
        i = argv.index("--")
        argv, pytest_args = argv[:i], argv[i + 1:]
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--keep", action="store_true", help="leave the temporary virtual environment in place")
    ap.add_argument("--python", default=sys.executable, help="the interpreter that creates the environment")
    args = ap.parse_args(argv)

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PIP_CONSTRAINT")}
    tmp = Path(tempfile.mkdtemp(prefix="rewriter-pins-"))
    venv = tmp / "venv"
    t0 = time.monotonic()
    try:
        subprocess.run([args.python, "-m", "venv", str(venv)], check=True)
        python = venv / "bin" / "python"
        env["VIRTUAL_ENV"] = str(venv)
        env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
        if run([str(python), "-m", "pip", "install", "-q", "-r", "requirements-dev.txt"], env).returncode:
            print("install failed: constraints.txt left unchanged", file=sys.stderr)
            return 1
        pins = freeze(python, env)
        tests = run([str(python), "-m", "pytest", *pytest_args], env)
        if tests.returncode:
            print(f"tests failed (exit {tests.returncode}): constraints.txt left unchanged", file=sys.stderr)
            return tests.returncode
        old = set(CONSTRAINTS.read_text().splitlines()) if CONSTRAINTS.exists() else set()
        CONSTRAINTS.write_text(HEADER + "\n".join(pins) + "\n")
        changed = [p for p in pins if p not in old]
        print(f"constraints.txt: {len(pins)} pins, {len(changed)} changed"
              + (": " + ", ".join(changed) if changed else "") + f" ({time.monotonic() - t0:.0f} s)")
        return 0
    finally:
        if args.keep:
            print(f"environment kept: {venv}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
