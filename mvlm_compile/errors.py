"""Errors that reach the user as one line and a documented exit status.

Exit statuses of every `mvlm-compile` command (also in the docs: docs/troubleshooting.md):
  0    success
  1    numerical failure (verify or a golden check: a tolerance was exceeded)
  2    usage or input error (bad option, missing/corrupt/unreadable file, wrong model,
       mis-shaped tensor, an output directory that is not ours, a busy lock, a full disk)
  3    engines not built here: the bundle is prepared for the target (no TensorRT or no matching GPU)
  4    internal error: a bug in mvlm-compile (`--debug` shows the traceback)
  130  interrupted (Ctrl-C or SIGTERM); partial outputs are removed

The errors are click exceptions, so click (and its test runner) exit with the same status
as the installed command.
"""

from __future__ import annotations

import click

EXIT_OK = 0
EXIT_NUMERICAL_FAILURE = 1
EXIT_INPUT_ERROR = 2
EXIT_ENGINES_DEFERRED = 3
EXIT_INTERNAL_ERROR = 4
EXIT_INTERRUPTED = 130


def collapse_whitespace(message: str) -> str:
    """`message` with every run of whitespace (newlines of a library's message, a YAML parser's
    context lines, a table) made one space: an error is one line in a log or a terminal."""
    return " ".join(str(message).split())


class MvlmError(click.ClickException):
    """An error the user can act on: printed as `error: <message>` on one line, exits with `exit_code`."""

    exit_code = EXIT_INPUT_ERROR

    def show(self, file=None) -> None:
        click.echo(f"error: {collapse_whitespace(self.format_message())}", err=True, file=file)


class CheckpointError(MvlmError):
    """The checkpoint directory is not a usable MobileVLM V2 checkpoint."""


class ArtifactError(MvlmError):
    """An artifacts/golden directory is missing files or does not match what is expected."""


class NumericalFailure(MvlmError):
    """Outputs differ from the golden tensors beyond tolerance."""

    exit_code = EXIT_NUMERICAL_FAILURE


class EnginesDeferred(MvlmError):
    """Not an error of the user's: the bundle is ready, the engines are built on the target. Its
    message keeps its lines: the command to run on the target stands on its own, to be copied."""

    exit_code = EXIT_ENGINES_DEFERRED

    def show(self, file=None) -> None:
        click.echo(self.format_message(), err=True, file=file)


class InternalError(MvlmError):
    """An unexpected exception, reported in one line (the traceback with --debug)."""

    exit_code = EXIT_INTERNAL_ERROR


class Interrupted(MvlmError):
    exit_code = EXIT_INTERRUPTED

    def show(self, file=None) -> None:
        click.echo(f"interrupted: {collapse_whitespace(self.format_message())}", err=True, file=file)
