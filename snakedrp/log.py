"""Logging set-up shared by the workflow scripts and the command line."""
from __future__ import annotations

import logging
import sys
from pathlib import Path


def configure(log_path: str | Path | None = None, level: int = logging.INFO) -> logging.Logger:
    """Send ``snakedrp`` log records to ``log_path`` (if given) and to stderr; return the logger."""
    logger = logging.getLogger("snakedrp")
    logger.setLevel(level)
    logger.handlers.clear()
    fmt = logging.Formatter("%(asctime)s %(name)s %(levelname)s: %(message)s")
    handlers = [logging.StreamHandler(sys.stderr)]
    if log_path:
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        handlers.append(logging.FileHandler(log_path, mode="w"))
    for h in handlers:
        h.setFormatter(fmt)
        logger.addHandler(h)
    logging.captureWarnings(True)
    return logger
