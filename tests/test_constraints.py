"""Reproducible installs: constraints.txt pins what CI tested, and install.sh / .ci/run use it by default.

The install script is run for real against a stand-in ``python`` that records its arguments (no network, no
packages), so the test sees exactly which pip commands a fresh machine would run.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
CONSTRAINTS = REPO / "constraints.txt"


def pins() -> dict:
    out = {}
    for line in CONSTRAINTS.read_text().splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        m = re.fullmatch(r"([A-Za-z0-9._-]+)==([A-Za-z0-9.+!-]+)", line.strip())
        assert m, f"constraints.txt: not `name==version`: {line!r}"
        out[canonicalize_name(m.group(1))] = m.group(2)
    return out


def needed(root="iwsft", extras=("all",)) -> set:
    """Every distribution that root[extras] needs in this environment (torch's GPU wheels excluded)."""
    names, stack, done = set(), [(root, frozenset(extras))], set()
    while stack:
        name, ex = stack.pop()
        if (canonicalize_name(name), ex) in done:
            continue
        done.add((canonicalize_name(name), ex))
        for line in metadata.distribution(name).requires or []:
            req = Requirement(line)
            if req.marker and not any(req.marker.evaluate(dict(default_environment(), extra=e)) for e in ex or {""}):
                continue
            n = canonicalize_name(req.name)
            if n.startswith(("nvidia-", "triton", "cuda-")):
                continue
            if n != "iwsft":
                names.add(n)
            stack.append((req.name, frozenset(req.extras)))
    return names


def test_constraints_pin_every_dependency_at_the_tested_version():
    p = pins()
    assert "torch" not in p  # GPU nodes keep their CUDA torch; install.sh installs the CPU build on CPU machines
    assert p["torchtune"] == "0.6.1" and p["torchao"] == "0.15.0"
    missing = needed() - set(p) - {"torch"}
    assert not missing, f"not in constraints.txt (refresh it, see scripts/update_constraints.py): {sorted(missing)}"
    stale = {n: (v, metadata.version(n)) for n, v in p.items() if metadata.version(n) != v}
    assert not stale, f"constraints.txt differs from the tested environment (pinned, installed): {stale}"


def test_pyproject_ranges_admit_the_pins_and_keep_peft_below_0_19():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for r in project["dependencies"]] + [
        Requirement(r) for extra in project["optional-dependencies"].values() for r in extra
        if not r.startswith("iwsft[")]
    p = pins()
    for r in reqs:
        name = canonicalize_name(r.name)
        if name in p:
            assert r.specifier.contains(p[name], prereleases=True), (str(r), p[name])
    peft = [r for r in reqs if canonicalize_name(r.name) == "peft"]
    assert peft and all(not r.specifier.contains("0.19.0") for r in peft)  # 0.19+ rejects torchao 0.15


FAKE_PYTHON = """#!/usr/bin/env bash
echo "$*" >> "$FAKE_LOG"
if [ "$1" = "-c" ]; then
  case "$2" in
    "import torch") exit "${FAKE_HAS_TORCH:-1}" ;;
    *) echo "iwsft 0.1.0 torch 2.13.0"; exit 0 ;;
  esac
fi
exit 0
"""


def run_install(tmp_path, cwd=None, **env_extra):
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    py = venv / "bin" / "python"
    py.write_text(FAKE_PYTHON)
    py.chmod(0o755)
    log = tmp_path / "calls.log"
    env = dict(os.environ, IWSFT_VENV=str(venv), FAKE_LOG=str(log), **env_extra)
    for key in ("IWSFT_CONSTRAINTS", "IWSFT_TORCH_INDEX"):
        if key not in env_extra:
            env.pop(key, None)
    proc = subprocess.run(["bash", str(REPO / "scripts" / "install.sh")], env=env, capture_output=True, text=True,
                          cwd=None if cwd is None else str(cwd))
    return proc, (log.read_text().splitlines() if log.exists() else [])


def test_install_script_uses_the_constraints_by_default(tmp_path):
    proc, calls = run_install(tmp_path, FAKE_HAS_TORCH="1")
    assert proc.returncode == 0, proc.stderr
    installs = [c for c in calls if c.startswith("-m pip install") and "--upgrade pip" not in c]
    assert installs[0].startswith("-m pip install -q torch==2.13.0")  # no torch yet: the CPU build first
    assert installs[-1].startswith("-m pip install -q -e .[all]")
    assert all(c.endswith("-c constraints.txt") for c in installs), installs

    proc, calls = run_install(tmp_path / "free", FAKE_HAS_TORCH="0", IWSFT_CONSTRAINTS="none")
    assert proc.returncode == 0, proc.stderr
    installs = [c for c in calls if c.startswith("-m pip install") and "--upgrade pip" not in c]
    assert installs == ["-m pip install -q -e .[all]"]  # torch kept, nothing pinned

    proc, _ = run_install(tmp_path / "bad", IWSFT_CONSTRAINTS="nope.txt")
    assert proc.returncode != 0 and "nope.txt not found" in proc.stdout


def test_install_script_torch_index_is_opt_in_and_relative_paths_resolve_from_the_caller(tmp_path):
    cpu = "https://download.pytorch.org/whl/cpu"
    _, calls = run_install(tmp_path / "default", FAKE_HAS_TORCH="1")
    assert not any("index-url" in c for c in calls)  # by default pip's own index only (CI: PyPI)
    proc, calls = run_install(tmp_path / "idx", FAKE_HAS_TORCH="1", IWSFT_TORCH_INDEX=cpu)
    assert proc.returncode == 0, proc.stderr
    assert [c for c in calls if "index-url" in c] == [
        f"-m pip install -q torch==2.13.0 --index-url {cpu} -c constraints.txt"]  # torch only, still pinned
    # A relative IWSFT_CONSTRAINTS is the caller's file, not one in the checkout (the script cd's to the repo).
    caller = tmp_path / "caller"
    caller.mkdir()
    (caller / "mine.txt").write_text("")
    assert not (REPO / "mine.txt").exists()
    proc, calls = run_install(tmp_path / "rel", cwd=caller, IWSFT_CONSTRAINTS="mine.txt")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    installs = [c for c in calls if c.startswith("-m pip install") and "--upgrade pip" not in c]
    assert installs and all(c.endswith(f"-c {caller / 'mine.txt'}") for c in installs), installs


def test_ci_installs_with_the_constraints():
    text = (REPO / ".ci" / "run").read_text()
    assert 'IWSFT_CONSTRAINTS="${IWSFT_CONSTRAINTS:-constraints.txt}" bash scripts/install.sh' in text
