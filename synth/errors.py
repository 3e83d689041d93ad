"""The one family of user-facing errors.

Anything a user can fix (a setting, a file, a server, a full disk) raises a subclass of `UserError`
with a one-line message naming what to change. The `synth` and `train` entry points (synth/cli.py)
print `error: <message>` and exit 2 for these, and let every other exception show its traceback,
because that is a bug in rlaif-forge.
"""

from __future__ import annotations

from synth.secrets import scrub


class UserError(Exception):
    """A problem the user can fix; the message is one line naming the setting, file or server. Known
    secrets and URL credentials are scrubbed from it when it is raised (synth.secrets)."""

    def __init__(self, message: object = "", *args: object) -> None:
        super().__init__(scrub(str(message)), *args)


class ConfigError(UserError, ValueError):
    """A bad configuration: one line that names the setting and the fix."""


class SourceError(UserError, ValueError):
    """A user-facing problem with the input data of `synth` (file, line and field named)."""


class DataError(UserError, ValueError):
    """A user's training-data problem, with the file, row and field named."""


class ConstitutionError(UserError, ValueError):
    """A constitution could not be found, parsed or validated. The message says what to fix."""


class BackendError(UserError, RuntimeError):
    """A backend failed for good (retries exhausted, server misconfigured). The message names the server,
    the model and the last failure, never a credential. The runner loses the current chunk only."""


class OutputError(UserError, OSError):
    """The output folder cannot be used: held by another run, not a folder, or the disk is full."""
