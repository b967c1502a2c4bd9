"""Errors that reach the user as one line and a documented exit status.

Exit statuses of every `mvlm-compile` command (also in the README):
  0  success
  1  numerical failure (verify: a tolerance was exceeded)
  2  usage or input error (bad option, missing/corrupt file, wrong model, mis-shaped tensor)
  3  engines not built here: the bundle is prepared for the target (no TensorRT or no matching GPU)
"""

EXIT_OK = 0
EXIT_NUMERICAL_FAILURE = 1
EXIT_INPUT_ERROR = 2
EXIT_ENGINES_DEFERRED = 3


class MvlmError(Exception):
    """An error the user can act on; the CLI prints `error: <message>` and exits with `exit_code`."""

    exit_code = EXIT_INPUT_ERROR


class CheckpointError(MvlmError):
    """The checkpoint directory is not a usable MobileVLM V2 checkpoint."""


class ArtifactError(MvlmError):
    """An artifacts/golden directory is missing files or does not match what is expected."""
