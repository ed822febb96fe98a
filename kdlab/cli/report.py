"""The one line every kdlab command prints when it fails: ``<tool>: error: <message>``.

``python -m kdlab`` writes ``kdlab: error: ...``, the tools ``kdlab.compare: error: ...``,
``kdlab.study: error: ...``, ``kdlab.export: error: ...`` and ``kdlab.zoo: error: ...``, as argparse names
its program; the exit status is the error's (2 for bad input, 1 for a runtime failure).
"""
from __future__ import annotations

import sys

from kdlab.errors import KdlabError


def error_line(tool: str, message: str) -> str:
    """``<tool>: error: <message>``, the message folded onto one line."""
    one = "; ".join(ln.strip() for ln in str(message).strip().splitlines() if ln.strip()) or "failed"
    return f"{tool}: error: {one}"


def report_error(tool: str, error: BaseException | str, hint: str | None = None) -> int:
    """Print the error line for ``error`` on stderr and return its exit status: a :class:`KdlabError` (or a
    message) its own (a message: 2); anything else is a runtime failure (1), named by its type, with ``hint``
    (e.g. how to get the traceback) appended."""
    if isinstance(error, KdlabError):
        message, code = str(error), error.exit_code
    elif isinstance(error, BaseException):
        first = (f"{type(error).__name__}: {error}".strip().splitlines() or [type(error).__name__])[0]
        message, code = first + (f" ({hint})" if hint else ""), 1
    else:
        message, code = str(error), 2
    print(error_line(tool, message), file=sys.stderr, flush=True)
    return code
