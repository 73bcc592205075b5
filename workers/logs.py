"""structlog on top of stdlib logging: JSON lines in production, a readable console in
development. Celery's own records go through the same handler, so one stream carries all."""

from __future__ import annotations

import logging
import sys

import structlog

_configured = False


def configure_logging(fmt: str = "console", level: str = "INFO", *, force: bool = False) -> None:
    """Route structlog and stdlib logging to stderr in one format. Idempotent."""
    global _configured
    if _configured and not force:
        return
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    renderer: structlog.types.Processor = (
        structlog.processors.JSONRenderer() if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=shared,
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.format_exc_info, renderer],
    ))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    _configured = True


#: Where Celery logs each task it receives and each it finishes (at INFO), and beat each entry
#: it sends: for the pump, every STATESWEEP_PUMP_INTERVAL_SECONDS, run or no run.
ROUTINE_TASK_LOGGERS = ("celery.worker.strategy", "celery.app.trace", "celery.beat")


class QuietTasks(logging.Filter):
    """Drops Celery's INFO records about the named tasks (received, succeeded, beat sending
    them): an idle deployment logs nothing at INFO. Warnings and errors about them pass."""

    def __init__(self, names: tuple[str, ...]) -> None:
        super().__init__()
        self.names = frozenset(names)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno > logging.INFO:
            return True
        data = getattr(record, "data", None)
        if isinstance(data, dict):  # worker.strategy and app.trace pass the task as data
            return data.get("name") not in self.names
        args = record.args if isinstance(record.args, tuple) else ()
        return not (len(args) == 2 and args[1] in self.names)  # beat: (entry name, task)


def quiet_routine_tasks(names: tuple[str, ...]) -> None:
    """Install QuietTasks on Celery's loggers for *names* (idempotent)."""
    for name in ROUTINE_TASK_LOGGERS:
        logger = logging.getLogger(name)
        logger.filters[:] = [f for f in logger.filters if not isinstance(f, QuietTasks)]
        logger.addFilter(QuietTasks(names))
