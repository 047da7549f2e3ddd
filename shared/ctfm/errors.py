"""One exception family for bad input, reported as one line at the command line.

Bundles run through ``python -m monai.bundle run``, whose tracebacks bury the cause under ignite and MONAI
frames (MONAI re-raises transform errors wrapped in ``RuntimeError``). :func:`install_excepthook` makes an
uncaught :class:`CTFMError` anywhere in the cause chain print ``error: <file>: <problem>`` and exit with
status 1; ``CTFM_TRACEBACK=1`` restores the full traceback.
"""

from __future__ import annotations

import os
import re
import sys

_WORKER_ERROR_LINE = re.compile(r"^ctfm\.[\w.]*Error: (.+)$")


class CTFMError(Exception):
    """Bad input or configuration; the message names the file and the problem on one line."""


def ctfm_error_message(exc: BaseException | None) -> str | None:
    """One line for the first :class:`CTFMError` in ``exc``'s cause chain, or ``None`` if there is none.

    An error raised in a DataLoader worker comes back as ``Caught X in DataLoader worker process N.`` with the
    worker's traceback as text; the ``ctfm...Error: <message>`` line of that text is found too.
    """
    seen = set()
    while exc is not None and id(exc) not in seen:
        lines = [line for line in str(exc).splitlines() if line.strip()]
        if isinstance(exc, CTFMError):
            return lines[0] if lines else type(exc).__name__
        if lines and lines[0].startswith("Caught "):
            found = [m.group(1) for line in lines if (m := _WORKER_ERROR_LINE.match(line))]
            if found:
                return found[-1]
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


def install_excepthook() -> None:
    """Report uncaught :class:`CTFMError`\\ s as one line on stderr (idempotent)."""
    if getattr(sys.excepthook, "_ctfm", False):
        return
    previous = sys.excepthook

    def hook(exc_type, exc, tb):
        message = ctfm_error_message(exc)
        if message is None or os.environ.get("CTFM_TRACEBACK") == "1":
            previous(exc_type, exc, tb)
        else:
            print(f"error: {message}", file=sys.stderr)

    hook._ctfm = True
    sys.excepthook = hook
