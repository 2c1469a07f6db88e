"""Log lines that name their request: every record written while an HTTP request is being served
(uvicorn's access line included) carries that request's X-Request-Id, so one grep finds all of it.

The id lives in a context variable set by RequestIdMiddleware; asyncio copies the context into
every task the request starts, so lines logged from its streaming body have it. The GenerateStream
call that carries every request to the scheduler (router/stream.py) logs with none.
"""
from __future__ import annotations

import asyncio
import contextvars
import logging

NO_REQUEST = "-"
current_request_id: contextvars.ContextVar[str] = contextvars.ContextVar(
    "request_id", default=NO_REQUEST)

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s [%(request_id)s] %(message)s"


class RequestIdFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = current_request_id.get()
        return True


class ShutdownCutFilter(logging.Filter):
    """uvicorn cancels the requests still running when --shutdown-timeout runs out, then logs each
    as "Exception in ASGI application" with the CancelledError's traceback. That is the flag doing
    its job, not a fault: the record becomes one warning line (the request id stays on it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if isinstance(error, asyncio.CancelledError) and "graceful shutdown" in str(error):
            record.msg, record.args = "request cut off: still running when --shutdown-timeout ran out", ()
            record.exc_info = record.exc_text = None
            self.warning(record)
        elif record.levelno == logging.ERROR and "timeout graceful shutdown exceeded" in record.getMessage():
            self.warning(record)  # uvicorn's "Cancel N running task(s)" before those lines
        return True

    @staticmethod
    def warning(record: logging.LogRecord) -> None:
        record.levelno, record.levelname = logging.WARNING, "WARNING"


def configure_logging(level: str) -> None:
    """The root handler for the router and for uvicorn (started with log_config=None, its loggers
    propagate here instead of using formats of their own that would drop the id)."""
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter())
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
    logging.getLogger("uvicorn.error").addFilter(ShutdownCutFilter())
