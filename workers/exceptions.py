"""Errors statesweep raises on purpose. Each one carries a message a user can act on."""

from __future__ import annotations


class StatesweepError(Exception):
    """Base of every error statesweep raises deliberately."""


class SettingsError(StatesweepError, ValueError):
    """One or more settings are invalid; the message names each variable and its value."""


class SchemaError(StatesweepError):
    """The database does not hold the tables or columns statesweep needs."""


class RefusedError(StatesweepError):
    """statesweep refuses to act (e.g. to alter a database it does not own)."""


class InvalidArgument(StatesweepError, ValueError):
    """A task or command argument is invalid; nothing was deleted."""


class NotFound(StatesweepError, LookupError):
    """A dag run, asset or cleanup run that was named does not exist."""
