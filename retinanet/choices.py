"""Choices by name: each is a `Literal` alias defined once, in the module of its concept
(e.g. `NormKind` in retinanet/model/norm.py); the config and that module check values against
the same alias with `check_choice`."""

from __future__ import annotations

from typing import Any, get_args


def check_choice(value: Any, choices: Any, what: str) -> None:
    """Raise ValueError naming `what` unless `value` is one of the Literal alias `choices`."""
    options = get_args(choices)
    if value not in options:
        raise ValueError(f"{what} must be one of {list(options)}, got {value!r}")
