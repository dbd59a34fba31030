"""Errors raised by ptqbench: one line, naming the bad value and the valid choices."""
from __future__ import annotations

from collections.abc import Iterable


class PtqbenchError(Exception):
    """Base class for every error ptqbench raises on bad input or a failed run."""


class UnknownNameError(PtqbenchError, KeyError):
    """A name (format, method, model, task, ...) that is not registered."""

    def __init__(self, kind: str, value: object, choices: Iterable[object]):
        self.kind, self.value, self.choices = kind, value, sorted(str(c) for c in choices)
        super().__init__(f"unknown {kind} {value!r}; choose one of: {', '.join(self.choices)}")

    def __str__(self) -> str:  # KeyError would otherwise quote the whole message
        return self.args[0]


class InvalidValueError(PtqbenchError, ValueError):
    """A parameter with a value outside its valid range or set."""

    def __init__(self, what: str, value: object, valid: str):
        self.what, self.value, self.valid = what, value, valid
        super().__init__(f"invalid {what} {value!r}; valid: {valid}")


class UnsupportedModelError(PtqbenchError):
    """A method that cannot run on a model's architecture, with the reason (never run silently wrong)."""

    def __init__(self, method: str, family: str, why: str):
        self.method, self.family, self.why = method, family, why
        super().__init__(f"{method} does not support {family} models: {why}")
