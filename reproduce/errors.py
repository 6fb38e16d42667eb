"""What can go wrong, and the exit status each kind gets: the one mapping for every command.

  Refused  exit 2    bad input, refused before or instead of the work: a config key, a file, a path, a run
                     directory, data, weights, a tracking store that is not there. The message names the
                     input and the fix.
  Failed   exit 1    the environment or the run failed: a process group that cannot form, a stalled rank,
                     a loss that is no longer finite.
  a stop   exit 143  SIGTERM / SIGINT / SIGUSR1 (reproduce/stop.py)

Every error class of the suite derives from one of the two (and from the builtin it always was, so
existing `except ValueError` and the like keep working). A command's `main` is wrapped by `@command`:
a Refused or Failed that escapes it is printed as `error: <one line>` on stderr and becomes the
exit status, so commands raise instead of printing and returning codes by hand.
"""

from __future__ import annotations

import argparse
import functools
import sys
from typing import Callable


class Refused(Exception):
    """Bad input: exit status 2."""

    exit_status = 2


class Failed(Exception):
    """The environment or the run failed: exit status 1."""

    exit_status = 1


def one_line(err: BaseException | str, limit: int = 400) -> str:
    """The first non-empty line of an error's message, at most `limit` characters: what a user reads."""
    text = str(err)
    line = next((part.strip() for part in text.splitlines() if part.strip()), "") or type(err).__name__
    return line if len(line) <= limit else line[: limit - 3] + "..."


def report(err: Refused | Failed, prefix: str = "") -> int:
    """Print `err` as one line on stderr; its exit status."""
    print(f"error: {prefix}{one_line(err)}", file=sys.stderr)
    return err.exit_status


def command(main: Callable[..., int]) -> Callable[..., int]:
    """A command's main: a Refused or Failed escaping it is printed in one line and becomes its status."""

    @functools.wraps(main)
    def wrapped(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs)
        except (Refused, Failed) as err:
            return report(err)

    return wrapped


class ArgumentParser(argparse.ArgumentParser):
    """argparse's parser whose errors (a missing argument, an invalid choice) are one line on stderr,
    `error: PROG: MESSAGE (see PROG --help)`, with exit status 2 as argparse's own; its subcommands'
    parsers are of the same class. --help is argparse's."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {' '.join(message.split())} (see {self.prog} --help)\n")
