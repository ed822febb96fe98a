"""kdlab's error types.

Every error a user can cause ends the program with one clear line and a fixed exit status:
2 for bad configuration or input, 1 for runtime failures (missing data, NaN loss, I/O).
"""
from __future__ import annotations

import sys
from collections.abc import Iterable


class KdlabError(Exception):
    """Base class: a failure with a one-line message meant for the user."""

    exit_code = 1


class ConfigError(KdlabError):
    """Bad configuration or input (exit status 2)."""

    exit_code = 2


class DataError(KdlabError):
    """Data missing, empty or malformed on disk (exit status 1)."""

    exit_code = 1


class TrainingError(KdlabError):
    """A stage failed while training, e.g. a NaN loss (exit status 1)."""

    exit_code = 1


class StoreError(KdlabError):
    """The stage store cannot be read or written (exit status 1)."""

    exit_code = 1


def unknown_name(kind: str, name: object, known: Iterable[str]) -> ConfigError:
    """The error for an unknown registry name, listing the known ones."""
    known = sorted(known)
    return ConfigError(f"unknown {kind} {name!r}; known: {', '.join(known)}")


def warn(message: str) -> None:
    """A warning the user must see (a corrupted stage being retrained, a growing chain): one line on stderr,
    where errors go too, while the log (progress, INFO) goes to stdout and the run's log file."""
    print(f"kdlab: warning: {message}", file=sys.stderr, flush=True)
