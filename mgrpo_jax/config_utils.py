"""Helpers for experiment config files (configs/*.py)."""

from __future__ import annotations

import importlib.util
import os
import types


def load_sibling(this_file: str, name: str) -> types.ModuleType:
  """Imports configs/<name>.py next to `this_file`, so variants derive from a base config
  without `configs/` having to be an installed package (config files are loaded by path)."""
  path = os.path.join(os.path.dirname(os.path.abspath(this_file)), f"{name}.py")
  if not os.path.exists(path):
    raise FileNotFoundError(f"config {name!r} not found at {path}")
  spec = importlib.util.spec_from_file_location(f"mgrpo_configs.{name}", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module
