"""The stock ``tune`` CLI finds ``iwsft_distributed`` and its configs through the .pth hook.

When the project is pip-installed, ``iwsft_tune_registry.pth`` sits in site-packages. If this environment predates
that (an older editable install), the tests put the same .pth in a temporary site dir that a throwaway
``sitecustomize`` adds, so the stock ``tune`` script is still what runs.
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

from test_recipe import path_overrides, read_metrics, run_env, tiny_assets  # noqa: F401  (fixture)

REPO = Path(__file__).resolve().parents[1]
TUNE = Path(sys.executable).parent / "tune"
EXPECTED = ["tiny_cpu", "tiny_cpu_lora", "qwen_32b", "qwen_32b_lora", "qwen_7b", "qwen_7b_lora", "qwen_1_5b",
            "qwen_1_5b_lora", "selfcurate_tiny"]


def test_shipped_pth_is_the_registry_line():
    import importlib.util

    spec = importlib.util.spec_from_file_location("_reg", REPO / "iwsft" / "tune" / "registry.py")
    reg = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reg)
    assert (REPO / "iwsft_tune_registry.pth").read_text() == reg.PTH_LINE
    assert reg.recipe_path() == REPO / "recipes" / "iwsft_distributed.py"
    assert {n for n, _ in reg.config_paths()} >= set(EXPECTED)


def test_registry_module_imports_no_torch():
    code = ("import sys, importlib.util as u; s = u.spec_from_file_location('r', 'iwsft/tune/registry.py'); "
            "m = u.module_from_spec(s); s.loader.exec_module(m); "
            "assert 'torch' not in sys.modules and 'torchtune' not in sys.modules and 'iwsft' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


@pytest.fixture(scope="module")
def tune_env(tmp_path_factory):
    env = run_env()
    installed = Path(sysconfig.get_paths()["purelib"]) / "iwsft_tune_registry.pth"
    if not installed.is_file():
        site_dir = tmp_path_factory.mktemp("site")
        (site_dir / "iwsft_tune_registry.pth").write_text((REPO / "iwsft_tune_registry.pth").read_text())
        (site_dir / "sitecustomize.py").write_text(f"import site\nsite.addsitedir({str(site_dir)!r})\n")
        env["PYTHONPATH"] = os.pathsep.join([str(site_dir)] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


def tune(args, env, cwd, timeout=240):
    proc = subprocess.run([str(TUNE), *args], cwd=str(cwd), env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, f"tune {' '.join(args)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc.stdout


def test_tune_ls_lists_recipe_and_configs(tune_env, tmp_path):
    out = tune(["ls"], tune_env, tmp_path)
    lines = out.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("iwsft_distributed"))
    listed = {ln.split()[-1] for ln in lines[start:start + len(EXPECTED)]}
    assert listed == set(EXPECTED)


def test_tune_cp_copies_a_config(tune_env, tmp_path):
    tune(["cp", "qwen_32b", "my_run.yaml"], tune_env, tmp_path)
    assert (tmp_path / "my_run.yaml").read_text() == (REPO / "configs" / "qwen_32b.yaml").read_text()


def test_tune_run_single_process(tune_env, tiny_assets, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    tune(["run", "iwsft_distributed", "--config", "tiny_cpu", *path_overrides(tiny_assets, out), "epochs=1",
          "method=sft"], tune_env, tmp_path)
    rows = read_metrics(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert (out / "epoch_0" / "model-00001-of-00001.safetensors").is_file()


@pytest.mark.slow
def test_tune_run_two_processes(tune_env, tiny_assets, tmp_path):  # noqa: F811
    out = tmp_path / "run"
    stdout = tune(["run", "--nproc_per_node", "2", "iwsft_distributed", "--config", "tiny_cpu",
                   *path_overrides(tiny_assets, out), "epochs=1"], tune_env, tmp_path)
    assert "torchrun" in stdout
    rows = read_metrics(out)
    assert len(rows) == 3 and "weight_mean" in rows[0]
