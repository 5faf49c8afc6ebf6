"""Registers the ``iwsft_distributed`` recipe and its configs with the stock ``tune`` CLI.

torchtune 0.6.1 has no plugin API: ``tune run/ls/cp`` look recipes and configs up in the plain list
``torchtune._recipe_registry._ALL_RECIPES``. A registered entry may hold an absolute path, which ``tune`` then runs
by path (``runpy.run_path``, or ``python <file>`` under torchrun). So we append our entries to that list.

How it gets there without a wrapper script: the wheel ships ``iwsft_tune_registry.pth`` at the site-packages root.
Python executes its single ``import`` line at start-up; that line puts a tiny finder at the front of
``sys.meta_path`` which does nothing until ``torchtune._recipe_registry`` is imported for the first time. Then it
loads *this file by path* (so neither ``iwsft/__init__`` nor torch is imported at start-up) and calls
:func:`find_spec`, which returns torchtune's own module spec with a loader wrapped to call :func:`register` right
after the module has executed. Start-up cost for programs that never import torchtune: one ``find_spec`` call.

This module must only import the standard library (it runs inside an import of torchtune).
Set ``IWSFT_NO_TUNE_HOOK=1`` to disable the hook.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
from pathlib import Path
from typing import List, Optional, Tuple

RECIPE_NAME = "iwsft_distributed"
RECIPE_FILE = "iwsft_distributed.py"
TARGET_MODULE = "torchtune._recipe_registry"
_PACKAGE_DIR = Path(__file__).resolve().parents[1]  # .../iwsft


def asset_dirs() -> Tuple[Path, Path]:
    """``(recipes_dir, configs_dir)``: the source checkout's top-level ``recipes/``+``configs/`` (editable
    install), else the copies shipped inside the wheel (``iwsft/_tune_files``)."""
    root = _PACKAGE_DIR.parent
    if (root / "recipes" / RECIPE_FILE).is_file():
        return root / "recipes", root / "configs"
    shipped = _PACKAGE_DIR / "_tune_files"
    return shipped / "recipes", shipped / "configs"


def recipe_path() -> Path:
    return asset_dirs()[0] / RECIPE_FILE


def config_paths() -> List[Tuple[str, Path]]:
    """``[(name, path)]`` for every shipped config, name = file stem (``configs/qwen_32b.yaml`` → ``qwen_32b``)."""
    cfg_dir = asset_dirs()[1]
    if not cfg_dir.is_dir():
        return []
    return [(p.stem, p) for p in sorted(cfg_dir.glob("*.yaml"))]


def register(registry_module) -> None:
    """Append our Recipe/Config entries (absolute paths) to ``registry_module._ALL_RECIPES`` (idempotent)."""
    recipes = registry_module._ALL_RECIPES
    if any(getattr(r, "name", None) == RECIPE_NAME for r in recipes):
        return
    Recipe, Config = registry_module.Recipe, registry_module.Config
    recipes.append(
        Recipe(
            name=RECIPE_NAME,
            file_path=str(recipe_path()),
            configs=[Config(name=name, file_path=str(path)) for name, path in config_paths()],
            supports_distributed=True,
        )
    )


class _RegisteringLoader:
    """Delegates to torchtune's loader, then registers our entries in the freshly executed module."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        try:
            register(module)
        except Exception as exc:  # never break torchtune because of us
            print(f"iwsft: could not register the iwsft_distributed recipe with tune: {exc}", file=sys.stderr)

    def __getattr__(self, name):
        return getattr(self._loader, name)


def find_spec(name: str, path=None, target=None) -> Optional[importlib.machinery.ModuleSpec]:
    """Meta-path entry point: torchtune's spec for ``torchtune._recipe_registry`` with a registering loader."""
    if name != TARGET_MODULE or os.environ.get("IWSFT_NO_TUNE_HOOK"):
        return None
    spec = importlib.machinery.PathFinder.find_spec(name, path)
    if spec is None or spec.loader is None:
        return None
    spec.loader = _RegisteringLoader(spec.loader)
    return spec


# The one line shipped as ``iwsft_tune_registry.pth`` (kept here so tests and packaging use the same text).
# It defines a finder that, on the first import of torchtune._recipe_registry, removes itself, loads this file by
# path under a private name, and defers to its find_spec.
PTH_LINE = (
    "import sys; exec(\"class _IwsftTuneHook:\\n"
    " @classmethod\\n"
    " def find_spec(cls, name, path=None, target=None):\\n"
    "  if name != 'torchtune._recipe_registry': return None\\n"
    "  sys.meta_path.remove(cls)\\n"
    "  try:\\n"
    "   import importlib.util as u, os\\n"
    "   pkg = u.find_spec('iwsft')\\n"
    "   f = os.path.join(list(pkg.submodule_search_locations)[0], 'tune', 'registry.py')\\n"
    "   s = u.spec_from_file_location('_iwsft_tune_registry', f)\\n"
    "   m = u.module_from_spec(s); s.loader.exec_module(m)\\n"
    "   return m.find_spec(name, path, target)\\n"
    "  except Exception:\\n"
    "   return None\\n"
    "sys.meta_path.insert(0, _IwsftTuneHook)\")\n"
)


if __name__ == "__main__":  # python iwsft/tune/registry.py [--write-pth FILE]
    if len(sys.argv) == 3 and sys.argv[1] == "--write-pth":
        Path(sys.argv[2]).write_text(PTH_LINE)
    else:
        print(f"recipe: {recipe_path()}")
        for n, p in config_paths():
            print(f"config: {n} -> {p}")
