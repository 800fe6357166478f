"""A runner's log records, re-emitted in the HTTP process as if they were its own.

A runner is a separate process: without this, its records (the fast-path verdict at
load, llama.cpp's own warnings routed into ``edgevlm.llama`` by ``models.llama_lib``)
would go to its stderr, past the HTTP process's handlers, levels and filters.

The HTTP process sends its logger thresholds in LOAD (``thresholds``); the runner sets
the same ones (``apply_thresholds``), so a record that the HTTP process would drop is
dropped before it is pickled, and one it would keep crosses the socket as one LOG
message (``ForwardingHandler``). Thresholds, rather than forwarding every DEBUG record:
a record costs a pickle and a syscall, and records only come at load, restart and from
llama.cpp warnings, never per token, but a DEBUG line somewhere in a decode loop later
should not silently cost every token a send. Thresholds are taken once per runner
start: a level changed later reaches the next runner (a restart or a reload).

The HTTP process re-emits each record through ``logging.getLogger(name)`` at the same
level (``reemit``): handlers and filters treat it as any record of that logger; its
message starts ``runner <pid>: `` and it carries ``runner_pid``.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from typing import Any, Callable

from models.runner import protocol as p

_FALLBACK_FORMAT = "%(asctime)s runner %(process)d %(levelname)s %(name)s: %(message)s"


def thresholds() -> dict[str, int]:
    """The levels set on this process's loggers: ``""`` is the root, then every named
    logger with a level of its own (the others inherit, as they will in the runner)."""
    levels = {"": logging.getLogger().level}
    for name, logger in list(logging.Logger.manager.loggerDict.items()):
        if isinstance(logger, logging.Logger) and logger.level != logging.NOTSET:
            levels[name] = logger.level
    return levels


def apply_thresholds(levels: dict[str, int]) -> None:
    """Runner side: the HTTP process's thresholds, so its effective levels hold here too."""
    for name, level in levels.items():
        logging.getLogger(name).setLevel(level)


class ForwardingHandler(logging.Handler):
    """Sends each record to the HTTP process as ``(LOG, level, name, text, pid)``; writes it
    to stderr instead when the socket is gone (the server went away)."""

    def __init__(self, send: Callable[..., None]):
        super().__init__()
        self._send = send
        self._pid = os.getpid()
        self._inside = threading.local()  # a record logged while sending one is not sent
        self._fallback = logging.StreamHandler(sys.stderr)
        self._fallback.setFormatter(logging.Formatter(_FALLBACK_FORMAT))

    def emit(self, record: logging.LogRecord) -> None:
        if getattr(self._inside, "active", False):
            self._fallback.handle(record)
            return
        self._inside.active = True
        try:
            text = record.getMessage()
            if record.exc_info:
                text += "\n" + logging.Formatter().formatException(record.exc_info)
            self._send(p.LOG, record.levelno, record.name, text, self._pid)
        except (OSError, ValueError, EOFError):
            self._fallback.handle(record)
        except Exception:
            self.handleError(record)
        finally:
            self._inside.active = False


def forward_records(send: Callable[..., None]) -> None:
    """Runner side: from now on the root logger's records go to the HTTP process only."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
    root.addHandler(ForwardingHandler(send))


def reemit(message: tuple[Any, ...]) -> None:
    """HTTP side: a LOG message, through the same logger at the same level as in the runner."""
    _, level, name, text, pid = message
    logging.getLogger(name).log(level, "runner %d: %s", pid, text, extra={"runner_pid": pid})
