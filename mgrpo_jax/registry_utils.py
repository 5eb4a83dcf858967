"""Components chosen by name from a config (generators, rewards): one registry type for all.

  _REWARDS = Registry("reward", "unknown reward {name!r}; available: {known}")
  register = _REWARDS.register          # @register("ocr") on a class or factory function
  factory = _REWARDS.get("ocr")         # ValueError listing the known names if unregistered
"""

from __future__ import annotations

from typing import Any, Callable


class Registry:
  """Factories by name. Registering a name twice is an error: a second module must not silently
  replace a component that configs already select by that name.

  Args:
    kind: what is registered ("generator", "reward"); names it in the duplicate-name error.
    unknown: the unknown-name error message, formatted with `name` (the name asked for) and
      `known` (the sorted registered names), so that each registry can name its config field.
  """

  def __init__(self, kind: str, unknown: str):
    self.kind = kind
    self.unknown = unknown
    self._factories: dict[str, Callable[..., Any]] = {}

  def register(self, name: str):
    """Decorator `@register("name")` of a factory (a function or a class); returns it unchanged.

    Raises:
      ValueError: `name` is already registered.
    """
    def decorator(factory):
      if name in self._factories:
        raise ValueError(f"{self.kind} {name!r} is already registered")
      self._factories[name] = factory
      return factory
    return decorator

  def names(self) -> list[str]:
    """Sorted registered names."""
    return sorted(self._factories)

  def get(self, name: Any) -> Callable[..., Any]:
    """The factory registered as `name`.

    Raises:
      ValueError: unknown name (the message lists the registered ones).
    """
    if name not in self._factories:
      raise ValueError(self.unknown.format(name=name, known=self.names()))
    return self._factories[name]
