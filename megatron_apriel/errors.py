"""The project's errors and the one mapping from an error to a command's exit code.

Exit codes of every ``apriel`` verb, ``python -m megatron_apriel.<module>`` and ``tools/*.py``:
0 done, 1 error (a full or read-only disk included), 2 bad config or input, 3 checkpointed on a stop
request (SLURM requeues the job), 4 a training phase overran its ``fault.*_timeout`` (a hang: the
stacks and the ranks behind are in the log; SLURM requeues the job like a stop), 130 interrupted by
SIGINT (Ctrl-C), 143 stopped by SIGTERM.

Library code raises a subclass of :class:`AprielError` whose message names the file, line or key
at fault; it never exits the process. A verb's ``main(argv)`` is wrapped by :func:`cli_main`,
which turns such an error into one ``error: ...`` line on stderr and its exit code, so a tool
called from Python (``main([...]) == 2``) and from a shell behave alike.
"""

from __future__ import annotations

import errno
import functools
import signal
import sys
import threading
from typing import Callable, Optional

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_BAD_INPUT = 2
EXIT_REQUEUE = 3  # training and GRPO checkpointed on SIGTERM/SIGUSR1; slurm/*.sh requeue the job
EXIT_HANG = 4  # the progress watchdog found a phase over its budget (training/fault.py); requeued too
EXIT_SIGINT = 130  # the shell's 128 + signal number
EXIT_SIGTERM = 143


class AprielError(Exception):
    """Base of the project's errors; ``exit_code`` is what a command exits with when it stops on one."""

    exit_code = EXIT_ERROR


class InputError(AprielError, ValueError):
    """Bad config or input (a file, a flag, a record): the user can fix it. A ValueError, as the
    library raised before, so callers' ``except ValueError`` keep working."""

    exit_code = EXIT_BAD_INPUT


class RunError(AprielError, RuntimeError):
    """A stage that failed while running (a subprocess died, a worker crashed)."""

    exit_code = EXIT_ERROR


class Terminated(BaseException):
    """SIGTERM as an exception (like KeyboardInterrupt for SIGINT), so every writer's cleanup of its
    temporary files runs on the way out. A BaseException, so ``except Exception`` does not swallow it."""


def raise_terminated(signum, frame):
    raise Terminated(f"stopped by signal {signum}")


def error_message(e: BaseException) -> str:
    """The one-line text of an error (a KeyError's key without the quotes ``str()`` adds)."""
    if isinstance(e, KeyError) and e.args:
        return str(e.args[0])
    return str(e)


MainFn = Callable[[Optional[list]], Optional[int]]


def cli_main(bad_input: tuple[type[BaseException], ...] = (),
             bad_input_exit: int = EXIT_BAD_INPUT) -> Callable[[MainFn], Callable[..., int]]:
    """Decorate a verb's ``main(argv) -> int``: the one place errors become exit codes.

    Every verb spells an error the same way, ``error: <what>`` on one stderr line (the message
    names the file, key or flag; argparse's usage errors are one such line too where the verb's parser is
    :class:`megatron_apriel.outputs.ArgumentParser`). ``bad_input``
    names the exceptions of dependencies and the standard library that this verb reports as bad
    input (e.g. ``FileExistsError`` for an output
    folder already in use, ``OSError`` from ``from_pretrained`` on a folder that is not a model):
    they cannot subclass :class:`InputError`. ``bad_input_exit`` is 1 only for the tools named after
    Megatron-LM's (``preprocess_data.py``, ``merge_datasets.py``), which exit 1 on any error as
    those do. Any other exception is a bug and keeps its traceback.

    One interrupt behaviour for every verb: SIGTERM raises :class:`Terminated` (unless the verb
    installs its own handler, as training does to checkpoint), Ctrl-C KeyboardInterrupt; both unwind
    through the writers' cleanup and end in one line and exit 130 (SIGINT) or 143 (SIGTERM). A full
    or read-only disk met anywhere is one line naming the path and the cause, exit 1.
    """

    def wrap(main: MainFn) -> Callable[..., int]:
        @functools.wraps(main)
        def wrapped(argv: Optional[list] = None) -> int:
            previous = None
            if threading.current_thread() is threading.main_thread() and \
                    signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
                previous = signal.signal(signal.SIGTERM, raise_terminated)
            try:
                return int(main(argv) or EXIT_OK)
            except KeyboardInterrupt:
                code, msg = EXIT_SIGINT, "interrupted (SIGINT): stopped, nothing half-written left behind"
            except Terminated:
                code, msg = EXIT_SIGTERM, "stopped by SIGTERM: nothing half-written left behind"
            except OSError as e:
                if e.errno not in (errno.ENOSPC, errno.EROFS, errno.EDQUOT) and not isinstance(e, bad_input):
                    raise
                code = EXIT_ERROR if e.errno in (errno.ENOSPC, errno.EROFS, errno.EDQUOT) else bad_input_exit
                msg = (f"{e.filename}: {e.strerror.lower()}" if e.filename and e.strerror and code == EXIT_ERROR
                       else error_message(e))
            except InputError as e:
                code = bad_input_exit
                msg = error_message(e)
            except AprielError as e:
                code = e.exit_code
                msg = error_message(e)
            except bad_input as e:
                code = bad_input_exit
                msg = error_message(e)
            finally:
                if previous is not None:
                    signal.signal(signal.SIGTERM, previous)
            print(f"error: {msg}", file=sys.stderr, flush=True)
            return code

        return wrapped

    return wrap
