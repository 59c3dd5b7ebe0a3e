"""PINK's version, as installed: setuptools-scm derived it from git when the
wheel was built (pyproject.toml), so `pink --version` and the web's health
answer name the commit a host runs, which tells whether a rolling upgrade
reached it."""

from __future__ import annotations

import functools
import importlib.metadata

UNKNOWN = "0.0+unknown"  # a source tree used without being installed: pyproject.toml's fallback


@functools.cache
def version() -> str:
    """Read once: a process goes on naming the code it loaded after a deploy
    installs newer code beneath it, until it is restarted."""
    try:
        return importlib.metadata.version("pink")
    except importlib.metadata.PackageNotFoundError:
        return UNKNOWN
