"""Search spaces used only by tests; workers import them by reference like any user space."""

from __future__ import annotations

from typing import Any


def diverging_lr(trial: Any) -> dict[str, Any]:
    """A sane learning rate, and one so large that the training loss becomes infinite or NaN."""
    trial.suggest_categorical("lr", [3e-3, 1e12])
    return {"grad_clip": 0.0}
