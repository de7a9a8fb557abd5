"""Method knobs: each option a method reads, declared once, in that method's own module.

A :class:`Knob` holds the option's name, default, range and ``--help`` text. A method lists the
knobs it reads in its ``MethodSpec.knobs``; from there the run configuration
(:class:`oneshot.config.PruneConfig`) takes the field's default, help and range check, decides
whether the option applies to the chosen stages (a knob applies to the stage whose method lists
it), and the CLI, ``--help`` and the recipes follow. This module depends on nothing else in oneshot
but the errors, so every method module can import it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from oneshot.errors import ConfigError

T = TypeVar("T")


@dataclass(frozen=True)
class Knob(Generic[T]):
    """One option a method reads: ``name`` (the flag is ``--name`` with dashes), ``default``, ``help``.

    ``valid`` says whether a value is in range and ``expect`` what the range is, for the error;
    ``choices`` restricts a string; ``type`` is the CLI value type where the default is None.
    """

    name: str
    default: T
    help: str
    valid: Callable[[Any], bool] | None = None
    expect: str = ""
    choices: tuple[str, ...] | None = None
    type: Any = None

    @property
    def flag(self) -> str:
        """The CLI flag, ``--block-size`` for ``block_size``."""
        return "--" + self.name.replace("_", "-")

    def check(self, value: Any, flag: str | None = None) -> None:
        """Refuse a value outside the knob's range or choices (a one-line :class:`ConfigError`)."""
        flag = flag or self.flag
        if self.choices is not None and value not in self.choices:
            raise ConfigError(f"{flag} must be one of {', '.join(self.choices)} (got {value!r})")
        if self.valid is not None and not self.valid(value):
            raise ConfigError(f"{flag} must be {self.expect} (got {value!r})")


def positive(value: Any) -> bool:
    """Whether ``value`` is a number above 0."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0


def at_least(low: int) -> Callable[[Any], bool]:
    """A range check: an integer of at least ``low``."""

    def valid(value: Any) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= low

    return valid
