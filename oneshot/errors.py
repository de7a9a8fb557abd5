"""Exceptions raised by oneshot.

Every error a user can cause derives from :class:`OneshotError`; its message says what was wrong
and how to fix it. The CLI prints such messages on one line and exits non-zero.
"""

from __future__ import annotations


class OneshotError(Exception):
    """Base class for errors caused by the user's input or environment."""


class ConfigError(OneshotError, ValueError):
    """An option value is invalid (sparsity out of range, bad N:M pattern, unknown method, ...)."""


class DataError(OneshotError):
    """Calibration or evaluation data cannot be used (missing, empty, too short)."""


class ModelError(OneshotError):
    """The model cannot be loaded or is not supported by the driver."""


class OutputError(OneshotError):
    """The output folder cannot be written (exists without --overwrite, ...)."""


class NumericalError(OneshotError):
    """A solver failed even after the bounded damping retries (e.g. Cholesky never succeeded)."""
