"""`python -m app`: serve `app.main:app` with uvicorn, configured from the settings."""

from __future__ import annotations

import argparse
import os
import sys
import textwrap
from typing import Any

import uvicorn
from pydantic import ValidationError

from app import workers
from app.logs import logging_config
from app.settings import Settings, get_settings

APP = "app.main:app"


def _shown(default: Any) -> str:
    if default is None:
        return ""
    return str(default).lower() if isinstance(default, bool) else str(default)


def parse_arguments(argv: list[str] | None = None) -> None:
    """No options (the environment configures the service); `-h` lists the settings."""
    defaults = [
        f"{name.upper()}={_shown(field.default)}" for name, field in Settings.model_fields.items()
    ]
    argparse.ArgumentParser(
        prog="python -m app",
        description="Serve the recall service (uvicorn), configured by environment variables.",
        epilog="settings, with their defaults (README, Configuration; docs/design.md, Settings):\n"
        + textwrap.fill(
            "  ".join(defaults), width=100, initial_indent="  ", subsequent_indent="  "
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    ).parse_args(argv)


def main() -> None:
    parse_arguments()
    try:
        settings = get_settings()
    except ValidationError as exc:  # a line per setting, not a traceback (no values: secrets)
        lines = [f"  {'.'.join(map(str, e['loc'])).upper()}: {e['msg']}" for e in exc.errors()]
        sys.exit("python -m app: invalid settings\n" + "\n".join(lines))
    # One OpenMP/MKL thread per worker unless TORCH_THREADS says otherwise: a request is one
    # small matrix product, so more threads cannot make it faster, while W workers x C threads
    # on C cores oversubscribe the box and make FAISS/torch spin-wait each other (tail latency).
    # Set before uvicorn imports the app (and so torch and FAISS), inherited by the workers.
    threads = str(settings.torch_threads)
    os.environ["OMP_NUM_THREADS"] = threads
    os.environ["MKL_NUM_THREADS"] = threads
    options: dict[str, Any] = dict(
        log_config=logging_config(settings.log_format, settings.log_level),
        host=settings.host,
        port=settings.port,
        workers=settings.workers,
        timeout_graceful_shutdown=settings.shutdown_timeout_s,
        log_level=settings.log_level,
        access_log=False,  # the service writes its own (ACCESS_LOG: app/http/middleware.py)
    )
    if settings.workers > 1 and workers.SUPPORTED:
        # A listening socket per worker, so connections spread evenly (app/workers.py).
        sys.exit(workers.Supervisor(uvicorn.Config(APP, **options), settings.workers).run())
    uvicorn.run(APP, **options)


if __name__ == "__main__":
    main()
