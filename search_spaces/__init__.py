"""Named Optuna define-by-run search spaces, and lookup of user-defined ones.

A space is a plain function ``space(trial) -> dict`` that only calls ``trial.suggest_*`` and
returns fixed values as a dictionary. Ray Tune's OptunaSearch pickles it by reference, so it must
live in an importable module. Each suggested or returned key is either a run-configuration key
(see ``capdec.config.config_keys``) or starts with ``search/``: such keys record a quantity of the
search itself (for example the variance behind a standard deviation) and are not passed to
training.

Use a space of your own by naming it ``package.module:function`` on the command line or in the
settings file; the module must be importable on every Ray worker.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from search_spaces.epsilon import epsilon, epsilon_linear
from search_spaces.noise import full, noise

SEARCH_PREFIX = "search/"

SPACES: dict[str, Callable[[Any], dict[str, Any]]] = {
    "epsilon": epsilon,
    "epsilon_linear": epsilon_linear,
    "noise": noise,
    "full": full,
}


def get_space(name: str) -> Callable[[Any], dict[str, Any]]:
    """Return the space function for a registered name or a ``module:function`` path.

    Raises:
        ValueError: when the name is neither registered nor an importable ``module:function``.
    """
    if name in SPACES:
        return SPACES[name]
    if ":" not in name:
        raise ValueError(
            f"unknown search space {name!r}; choose one of {', '.join(SPACES)} "
            "or name your own as package.module:function"
        )
    module_name, _, function_name = name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"cannot import search space module {module_name!r}: {error}") from error
    space = getattr(module, function_name, None)
    if not callable(space):
        raise ValueError(f"search space {name!r}: {module_name} has no function {function_name!r}")
    return space


def describe_spaces() -> str:
    """Return one line per registered space: its name and the first line of its docstring."""
    lines = []
    for name, space in SPACES.items():
        summary = (space.__doc__ or "").strip().splitlines()[0]
        lines.append(f"{name}: {summary}")
    return "\n".join(lines)
