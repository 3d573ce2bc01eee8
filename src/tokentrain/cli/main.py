"""tokentrain: train causal LMs on pre-tokenized InternLM-format data (command line).

One entry, subcommands, errors as one line and a documented exit code.

Start-up stays fast: this module and the command modules import only the standard
library at the top; torch, transformers and deepspeed are imported inside the commands
that need them.
"""

from __future__ import annotations

import argparse
import errno
import importlib
import logging
import sys

from tokentrain import __version__
from tokentrain.errors import EXIT_FAILURE, EXIT_USAGE, SaidByMainRank, TokentrainError
from tokentrain.run.signals import EXIT_INTERRUPTED, ignore_while_ending, install_startup_handlers, restore_handlers
from tokentrain.utils import disk

# Each module defines `register(subparsers, parent)`, which adds its commands and sets
# `func` on them (a callable taking the parsed args and returning an exit code).
COMMAND_MODULES = [
    "tokentrain.cli.data_cmd",
    "tokentrain.cli.tokenize_cmd",
    "tokentrain.cli.cfg_cmd",
    "tokentrain.cli.train_cmd",
    "tokentrain.cli.plot_cmd",
    "tokentrain.cli.convert_cmd",
    "tokentrain.cli.chat_cmd",
]


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors: one line, our usage exit code
        self.print_usage(sys.stderr)
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show full tracebacks and debug logs")
    parser = _Parser(prog="tokentrain", description=__doc__.splitlines()[0], parents=[common])
    parser.add_argument("--version", action="version", version=f"tokentrain {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub, common)
    return parser


def setup_logging(debug: bool) -> None:
    from tokentrain.metrics.logger import LOG_DATEFMT, log_format  # time (and rank) on every line

    logging.basicConfig(
        level=logging.DEBUG if debug else logging.INFO, format=log_format(debug), datefmt=LOG_DATEFMT, stream=sys.stderr
    )


def main(argv: list[str] | None = None, *, as_process: bool = False) -> int:
    """Run one command; returns its exit code. `as_process`: this call is the whole process (the
    console script, `python -m tokentrain`, `python -m tokentrain.train`), which ends right after."""
    argv = sys.argv[1:] if argv is None else argv
    # `train`: a signal before the trainer's own handling ends it at once, 75/130, one line (see
    # run/signals.py); installed first thing, restored on return (the CLI may run in-process).
    saved = install_startup_handlers() if "train" in argv[:3] else None
    try:
        code = _run(argv)
    except KeyboardInterrupt:  # Ctrl-C before or after the command's own handling
        print("tokentrain: interrupted", file=sys.stderr)
        code = EXIT_INTERRUPTED
    finally:
        if saved and as_process:
            # The code is decided; the launcher's SIGTERM to the other ranks once one exits
            # (srun --kill-on-bad-exit, torchrun) may still reach this one as it ends: it must
            # not turn 3 or 75 into 143. In-process callers get their own handlers back.
            ignore_while_ending()
        elif saved:
            restore_handlers(saved)
    from tokentrain.distributed.spawn import record_exit_code

    record_exit_code(code)
    from tokentrain.utils import faults

    hold = faults.value("exit_sleep")  # tests: a signal while the process ends
    if hold:
        import time

        time.sleep(float(hold))
    return code


def entry() -> None:
    """The `tokentrain` console script."""
    sys.exit(main(as_process=True))


def _run(argv: list[str]) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_USAGE
    setup_logging(args.debug)
    try:
        from tokentrain.distributed import spawn

        if args.command == "train" and not args.dry_run and spawn.wants_spawn():
            from tokentrain.cli.train_cmd import preflight
            from tokentrain.run.parent_watch import grace_seconds

            spawn.check_nproc()
            grace_seconds()  # the ranks read it too: one line here rather than one per rank
            preflight(args, probe_lock=True)  # a usage error: one line here, not one per rank plus torchrun's
            return spawn.spawn_torchrun(argv[argv.index("train") + 1 :])
        return int(args.func(args) or 0)
    except TokentrainError as e:
        if args.debug:
            raise
        if not isinstance(e, SaidByMainRank):  # the main rank printed the reason: once, not per rank
            print(f"tokentrain: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        resume = "; nothing was saved since the last checkpoint (if any): continue with --resume auto"
        print(f"tokentrain: interrupted{resume if args.command == 'train' else ''}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:  # `tokentrain data show ... | head`
        return 0
    except OSError as e:  # a path of the user's that cannot be written or read: one line naming it
        line = path_error(e)
        if args.debug or line is None:
            raise
        print(f"tokentrain: error: {line}", file=sys.stderr)
        return EXIT_FAILURE if e.errno in disk.FULL else EXIT_USAGE
    except Exception as e:
        if args.debug:
            raise
        print(
            f"tokentrain: internal error: {type(e).__name__}: {e} (run with --debug for the traceback)", file=sys.stderr
        )
        return EXIT_FAILURE


# What to do about a path a command could not use (errno -> advice).
_PATH_ADVICE = {
    errno.ENAMETOOLONG: "use a shorter file or folder name (at most 255 bytes each)",
    errno.ENOENT: "create the folder first or give a path that exists",
    errno.ENOTDIR: "a part of the path is a file, not a folder; fix the path",
    errno.EISDIR: "it is a folder; give a file path",
    errno.EACCES: "it is not writable (or readable) by you; give another path or fix its permissions",
    errno.EPERM: "it is not writable (or readable) by you; give another path or fix its permissions",
    errno.EROFS: "it is on a read-only file system; give another path",
    errno.ENOSPC: "no space left on device; free space or give another path",
    errno.EDQUOT: "disk quota exceeded; free space or give another path",
    errno.ELOOP: "too many levels of symbolic links; fix the path",
}


def path_error(e: OSError) -> str | None:
    """One line for an OSError on a named path a user gave or chose, or None (not a user's situation)."""
    advice = _PATH_ADVICE.get(e.errno or 0)
    if advice is None or e.filename is None:
        return None
    name = str(e.filename)
    shown = name if len(name) <= 160 else name[:60] + "..." + name[-90:]
    return f"{shown}: {e.strerror}; {advice}"


if __name__ == "__main__":
    entry()
