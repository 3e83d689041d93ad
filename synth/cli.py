"""Shared by the `synth` and `train` entry points: user mistakes print one line and exit 2."""

from __future__ import annotations

import importlib
import sys

from synth.errors import UserError
from synth.secrets import scrub


def guarded(cfg, module: str) -> None:
    """Run `<module>.run(cfg)`; a `UserError` becomes `error: <message>` and exit code 2 (no traceback:
    the message names the setting, file or server to fix). Ctrl-C says how to resume and exits 130."""
    guarded_call(lambda: importlib.import_module(module).run(cfg))


def guarded_call(fn) -> None:
    """`guarded` for any callable (e.g. `synth-merge`, which has no Hydra config)."""
    try:
        fn()
    except UserError as e:
        print(f"error: {scrub(str(e))}", file=sys.stderr, flush=True)
        sys.exit(2)
    except FileNotFoundError as e:
        print(f"error: {scrub(str(e.filename or e))}: no such file or folder", file=sys.stderr, flush=True)
        sys.exit(2)
    except KeyboardInterrupt:
        # an interrupt can leave an event loop or a pipe half-closed; their complaints at garbage
        # collection are noise here (every committed row is already on disk)
        sys.unraisablehook = lambda *_: None
        print("interrupted; rerun the same command to resume", file=sys.stderr, flush=True)
        sys.exit(130)
