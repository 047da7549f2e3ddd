"""One exception family for bad input, and one line per error at the command line.

Bundles run through ``python -m monai.bundle run``, whose tracebacks bury the cause under ignite and MONAI
frames (MONAI re-raises transform errors wrapped in ``RuntimeError``, and its ``StatsHandler`` logs each one
with a full traceback before re-raising). :func:`install_excepthook` -- called by the bundles' ``initialize``
and by this package's command-line entry points, never at import -- makes an uncaught error print
``error: <file>: <problem>`` on stderr and exit with status 1, and silences the tracebacks logged on the way
out; ``CTFM_TRACEBACK=1`` restores both.
"""

from __future__ import annotations

import logging
import os
import re
import sys

__all__ = ["CTFMError", "ctfm_error_message", "error_line", "install_excepthook"]

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
        exc = _cause(exc)
    return None


def _cause(exc: BaseException) -> BaseException | None:
    """What ``exc`` was raised from: its explicit cause (``raise ... from e``, as MONAI and ignite wrap errors).
    An implicit context ("during handling of X, Y happened") is not followed: X was handled, Y is the error."""
    return exc.__cause__


def error_line(exc: BaseException) -> str:
    """The one line reported for ``exc``: a :class:`CTFMError`'s message, an ``OSError``'s file and reason, or
    the innermost cause's type and first line, with the config component MONAI failed to build from it."""
    message = ctfm_error_message(exc)
    if message is not None:
        return message
    chain, seen = [exc], {id(exc)}
    while _cause(chain[-1]) is not None and id(_cause(chain[-1])) not in seen:
        chain.append(_cause(chain[-1]))
        seen.add(id(chain[-1]))
    innermost = chain[-1]
    for e in (innermost, exc):
        if isinstance(e, OSError) and e.filename and e.strerror:
            return f"{e.filename}: {e.strerror}"
    lines = [line.strip() for line in str(innermost).splitlines() if line.strip()]
    found = next((m for e in chain if (m := _COMPONENT.search(str(e)))), None)
    where = f"{found.group(1)} from {found.group(2).replace(',', ', ')}" if found else None
    context = f" (building {where})" if where else ""
    return f"{type(innermost).__name__}: {lines[0] if lines else 'no message'}{context} (CTFM_TRACEBACK=1 shows the traceback)"


#: MONAI's message when a config component cannot be built: "Failed to instantiate component 'X' with keywords: a,b".
_COMPONENT = re.compile(r"Failed to instantiate component '([^']+)' with keywords: ([\w,]*)")


def _show_tracebacks() -> bool:
    return os.environ.get("CTFM_TRACEBACK") == "1"


class _DropLoggedTracebacks(logging.Filter):
    """Drop the two reports ignite and MONAI log of an exception that ends a run before re-raising it: MONAI
    ``StatsHandler``'s ``logger.exception("Exception: ...")`` and ignite's "... run is terminating due to exception"
    line. The excepthook prints that exception as one line; every other record passes untouched."""

    def filter(self, record: logging.LogRecord) -> bool:
        if _show_tracebacks() or record.levelno < logging.ERROR:
            return True
        message = str(record.msg)
        stats_handler = bool(record.exc_info) and message.startswith("Exception: ")
        return not stats_handler and "is terminating due to exception" not in message


_FILTER = _DropLoggedTracebacks()
#: Where MONAI's StatsHandler and ignite's engines (``ignite.engine.engine.<class name>``) log an exception that
#: ends a run.
_REPORTING_LOGGERS = ("monai.handlers.StatsHandler", "StatsHandler") + tuple(
    f"ignite.engine.engine.{name}" for name in ("Engine", "SupervisedTrainer", "SupervisedEvaluator", "EnsembleEvaluator", "GanTrainer")
)


def install_excepthook() -> None:
    """Report uncaught exceptions as one line on stderr and exit 1 (idempotent).

    Also filters every logging handler configured so far (MONAI's ``logging.conf`` is applied before a bundle's
    ``initialize`` runs) so that tracebacks logged on the way out are not printed first.
    """
    handlers = list(logging.getLogger().handlers)
    for logger in list(logging.Logger.manager.loggerDict.values()):
        handlers += getattr(logger, "handlers", [])
    # the loggers themselves too: a StatsHandler made later gets a handler of its own, which the filter would miss
    loggers = [logging.getLogger(name) for name in _REPORTING_LOGGERS]
    for target in [*handlers, *loggers]:
        if _FILTER not in target.filters:
            target.addFilter(_FILTER)
    if getattr(sys.excepthook, "_ctfm", False):
        return
    previous = sys.excepthook

    def hook(exc_type, exc, tb):
        if _show_tracebacks() or issubclass(exc_type, KeyboardInterrupt):
            previous(exc_type, exc, tb)
        else:
            print(f"error: {error_line(exc)}", file=sys.stderr)

    hook._ctfm = True
    sys.excepthook = hook
