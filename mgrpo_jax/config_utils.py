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


def parse_variants(arg: str | None) -> list[str]:
  """`'flat,mixing'` -> ['flat', 'mixing']: the variants named after `file.py:` (in order)."""
  if not arg:
    return []
  names = [a.strip() for a in str(arg).split(",")]
  if any(not n for n in names):
    raise ValueError(f"config variant list {arg!r} has an empty entry")
  return names


def apply_variants(config, arg: str | None, variants: dict, where: str):
  """Applies each variant named in `arg` (comma-separated, in order) to `config` in place.

  Args:
    config: the config to change.
    arg: the text after `file.py:`, e.g. 'flat,pickscore' (None or '' = no variant).
    variants: name -> function(config) that changes the config for that variant.
    where: the config file's name, for the error message.

  Returns:
    The config.

  Raises:
    ValueError: a name that is not a variant of this config (lists the known ones).
  """
  for name in parse_variants(arg):
    if name not in variants:
      raise ValueError(f"unknown variant {name!r} of {where}; known: {sorted(variants)} "
                       f"(combine them with commas, e.g. {where}:{','.join(sorted(variants))})")
    variants[name](config)
  return config
