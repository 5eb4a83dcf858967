"""Clean command-line errors for mgrpo-train, mgrpo-sample and mgrpo-eval.

A user's mistake (a misspelt config field, a missing file, bad weights or data, a workdir another
run holds) ends the program with one readable message on stderr and a non-zero exit status
instead of a traceback; `--debug` shows the traceback. Exit statuses: 2 for flag and config
mistakes found while parsing the command line, 1 for errors of the run.

Usage, in an entry point module:
  def run():
    cli.run(main, "mgrpo-train")
"""

from __future__ import annotations

import difflib
import importlib.util
import os
import sys
from typing import Any, Callable, Sequence

from absl import app, flags

DEBUG = flags.DEFINE_bool("debug", False, "On an error, show the full traceback instead of a "
                          "one-line message.")

EXIT_ERROR = 1
EXIT_USAGE = 2
# Exceptions whose message is written for the user; any other type is named in front of its
# message, since it more likely is a bug.
_USER_ERRORS = (ValueError, OSError, LookupError, RuntimeError, ImportError, flags.Error)


def fail(program: str, message: str, status: int = EXIT_ERROR):
  """Prints `program: error: message` to stderr and exits with `status`."""
  print(f"{program}: error: {message}", file=sys.stderr, flush=True)
  sys.exit(status)


def _debug_requested(argv: Sequence[str]) -> bool:
  return any(a in ("--debug", "--debug=true", "--debug=True", "--debug=1") for a in argv)


# ---- config overrides --------------------------------------------------------------------------
def _config_arg(argv: Sequence[str], name: str = "config") -> str | None:
  """The value of `--config=...` / `--config ...` in argv (the last one), or None."""
  value = None
  for i, arg in enumerate(argv):
    if arg.startswith(f"--{name}="):
      value = arg.split("=", 1)[1]
    elif arg == f"--{name}" and i + 1 < len(argv):
      value = argv[i + 1]
  return value


def _load_config(spec: str):
  """`path.py[:arg]` -> the config, the way ml_collections' config flag loads it."""
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("mgrpo_cli_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def override_error_message(config, overrides: Sequence[str]) -> str | None:
  """Names the first `--config.a.b=v` override whose field does not exist, with a suggestion.

  Args:
    config: the loaded ConfigDict.
    overrides: command-line arguments; those starting with `--config.` are checked.

  Returns:
    e.g. "--config.train.learing_rate: config.train has no field 'learing_rate'; did you mean
    'learning_rate'?", or None when every override names an existing field.
  """
  import ml_collections  # pylint: disable=import-outside-toplevel
  for arg in overrides:
    if not arg.startswith("--config."):
      continue
    flag = arg[2:].split("=", 1)[0]
    keys = flag.split(".")[1:]
    node, parent = config, "config"
    for key in keys:
      if not isinstance(node, (ml_collections.ConfigDict, dict)):
        return (f"--{flag}: {parent} is a {type(node).__name__} ({node!r}), not a group of "
                "fields")
      fields = list(node.keys())
      if key not in fields:
        close = difflib.get_close_matches(key, fields, n=3, cutoff=0.6)
        hint = (f"did you mean {' or '.join(repr(c) for c in close)}?" if close else
                f"its fields are {', '.join(sorted(fields))}")
        return f"--{flag}: {parent} has no field {key!r}; {hint}"
      node, parent = node[key], f"{parent}.{key}"
  return None


def flag_error_message(error: BaseException, argv: Sequence[str]) -> str:
  """One readable message for an error raised while parsing the command line."""
  spec = _config_arg(argv)
  if spec is not None:
    path = spec.partition(":")[0]
    if not os.path.isfile(path):
      return f"--config: config file {path} does not exist"
    try:
      config = _load_config(spec)
    except Exception as e:  # pylint: disable=broad-except  (the config file's own error)
      return f"--config={spec}: {error_message(e)}"
    message = override_error_message(config, argv)
    if message:
      return message
  return error_message(error)


def error_message(error: BaseException) -> str:
  """The message of an exception without its traceback, on as few lines as it allows."""
  if isinstance(error, KeyError) and len(error.args) == 1 and isinstance(error.args[0], str):
    text = error.args[0]  # str(KeyError) is the repr of its argument
  else:
    text = str(error)
  if "Traceback (most recent call last)" in text:
    # absl wraps a config file's exception with its formatted traceback: keep the last line.
    lines = [l.strip() for l in text.splitlines() if l.strip()]
    text = lines[-1] if lines else text
  text = text.strip() or type(error).__name__
  if not isinstance(error, _USER_ERRORS):
    text = f"{type(error).__name__}: {text}"
  return text


# ---- entry points ------------------------------------------------------------------------------
def parse_flags(argv: list[str], program: str) -> list[str]:
  """absl flags parser that turns flag and config-override mistakes into one-line errors."""
  spec = _config_arg(argv)
  if spec is not None and not os.path.isfile(spec.partition(":")[0]) \
      and not _debug_requested(argv):
    # ml_collections loads the file lazily, and then fails with a multi-line message.
    fail(program, f"--config: config file {spec.partition(':')[0]} does not exist", EXIT_USAGE)
  try:
    return flags.FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except  (flags.Error, ml_collections errors)
    if _debug_requested(argv):
      raise
    fail(program, flag_error_message(e, argv) + " (--debug shows the traceback)", EXIT_USAGE)
    raise  # unreachable: fail exits


def run(main: Callable[[list[str]], Any], program: str) -> None:
  """`absl.app.run(main)` with clean errors: flag mistakes exit 2, errors of `main` exit 1."""

  def guarded(argv):
    try:
      return main(argv)
    except (SystemExit, KeyboardInterrupt, app.UsageError):
      raise  # absl prints a UsageError with the flags' help
    except Exception as e:  # pylint: disable=broad-except
      if DEBUG.value:
        raise
      fail(program, error_message(e) + " (--debug shows the traceback)", EXIT_ERROR)

  app.run(guarded, argv=sys.argv, flags_parser=lambda argv: parse_flags(argv, program))
