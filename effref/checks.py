"""Argument checks shared by the public entry points, so that a wrong argument fails early, by its name, with
the fix, instead of deep inside a technique with an attribute error.

``config_or_default(cfg, Expected, example)`` is the one every model-level call runs on its config: ``None``
gives ``Expected()``, an instance passes, anything else (a float where a ``PruneConfig`` belongs, a
``QuantConfig`` where a ``GPTQConfig`` wraps one, a dict) raises a ``TypeError`` saying what to pass.
"""

from __future__ import annotations

from typing import TypeVar

Config = TypeVar("Config")


def config_or_default(value: object, expected: type[Config], example: str, name: str = "cfg") -> Config:
    """``value`` when it is an ``expected``, a default ``expected()`` when it is None; else a TypeError."""
    if value is None:
        return expected()
    if not isinstance(value, expected):
        raise TypeError(f"{name} must be a {expected.__name__}, got {type(value).__name__} {value!r}; "
                        f"pass e.g. {example}")
    return value
