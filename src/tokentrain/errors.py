"""Errors a user can act on, each mapped to a documented process exit code.

Anything raised as a `TokentrainError` is printed by the CLI as one line (no traceback
unless `--debug`) and turned into its `exit_code`. Anything else is a bug or an
environment failure and exits with `EXIT_FAILURE`.
"""

EXIT_OK = 0
EXIT_FAILURE = 1  # unexpected failure (a bug, a crashed rank, out of memory, ...)
EXIT_USAGE = 2  # bad command line or config
EXIT_DATA = 3  # bad training data
EXIT_PREEMPTED = 75  # stopped by SIGTERM/SIGUSR1 after writing a checkpoint (EX_TEMPFAIL: retry)


class TokentrainError(Exception):
    """A failure with a one-line message that tells the user what to do."""

    exit_code = EXIT_FAILURE


class ConfigError(TokentrainError):
    exit_code = EXIT_USAGE


class DataError(TokentrainError):
    exit_code = EXIT_DATA


class CheckpointError(TokentrainError):
    """A checkpoint could not be written, or one to resume from is damaged (exit 1)."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint file holds pickled objects outside its engine's allow-list: it is never
    loaded (it could run code). Bad input, like bad data (exit 3)."""

    exit_code = EXIT_DATA


class SaidByMainRank(TokentrainError):
    """This rank stops because the main rank refused (a resume, a check all ranks share), and
    the main rank's one line says why: the CLI prints nothing for it, so the reason is read
    once, not once per rank. Exits with the main rank's code."""

    def __init__(self, exit_code: int):
        super().__init__(f"stopped: the main rank refused (exit {exit_code}; its message says why)")
        self.exit_code = exit_code


def first_line(e: BaseException) -> str:
    """The first line of an exception's message (its type when it has none): what a one-line
    error quotes of a library's multi-line one."""
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__
