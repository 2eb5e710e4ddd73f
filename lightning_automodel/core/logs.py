"""The package's lines reach the user once per job: INFO from global rank 0 only (warnings from every rank: a rank
that differs must be seen), shown without logging configuration, and once under ``logging.basicConfig``."""

from __future__ import annotations

import logging
import os
import sys

PACKAGE_LOGGER = "lightning_automodel"


def process_rank() -> int:
    """Global rank: the process group's, else ``RANK``, else ``LOCAL_RANK`` (data modules precede the group)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    for variable in ("RANK", "LOCAL_RANK"):
        value = os.environ.get(variable, "")
        if value.isdigit():
            return int(value)
    return 0


def _rank_zero_info(record: logging.LogRecord) -> bool:
    """A logging filter: INFO and lower on global rank 0 only; warnings and errors on every rank."""
    return record.levelno >= logging.WARNING or process_rank() == 0


def rank_zero_logger(name: str) -> logging.Logger:
    """The module logger ``name``, whose INFO lines only rank 0 emits."""
    logger = logging.getLogger(name)
    if _rank_zero_info not in logger.filters:
        logger.addFilter(_rank_zero_info)
    return logger


class FallbackHandler(logging.StreamHandler):
    """Writes to stderr only when no other handler on the way to the root would (``lastResort`` for INFO too)."""

    def emit(self, record: logging.LogRecord) -> None:
        logger: logging.Logger | None = logging.getLogger(record.name)
        while logger is not None:
            if any(h is not self for h in logger.handlers):
                return
            logger = logger.parent if logger.propagate else None
        self.stream = sys.stderr  # the stderr of the moment (captures replace it between runs)
        super().emit(record)


def show_info_without_config() -> None:
    """Install :class:`FallbackHandler` on the package logger, at INFO unless the user chose a level."""
    logger = logging.getLogger(PACKAGE_LOGGER)
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.INFO)
    if not any(isinstance(h, FallbackHandler) for h in logger.handlers):
        handler = FallbackHandler()
        handler.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(handler)
