"""Shared by the `synth` and `train` entry points: user mistakes print one line and exit 2."""

from __future__ import annotations

import importlib
import sys

USER_ERRORS = ("ConfigError", "ConstitutionError", "SourceError", "DataError", "BackendError", "FileNotFoundError")


def guarded(cfg, module: str) -> None:
    """Run `<module>.run(cfg)`; a known user-facing error becomes `error: <message>` and exit code 2
    (no traceback: the message names the setting, file or server to fix)."""
    try:
        importlib.import_module(module).run(cfg)
    except Exception as e:
        if type(e).__name__ in USER_ERRORS or any(b.__name__ in USER_ERRORS for b in type(e).__mro__):
            print(f"error: {e}", file=sys.stderr, flush=True)
            sys.exit(2)
        raise
