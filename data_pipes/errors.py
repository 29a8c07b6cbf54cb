"""`UserError`: the base of every error that is the user's input, not a bug in this project.

Each command (`python -m train`, `train.export`, `train.compare`, `distill.build`, `data_pipes.shards.make`) catches
it once and prints its message, which names the problem and the fix, without a stack trace; anything else is a bug
and keeps its traceback. It lives in the lowest layer (data) so that every package can derive its errors from it.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager


class UserError(Exception):
    """Bad input (a path, a setting, a file that is not ours); the message says what is wrong and how to fix it."""


class Problems(UserError):
    """Several problems found together (a command's preflight), each with its fix; raised only when there are any.

    Collect with `problems.collect()` around code that raises a `UserError` (its message becomes one problem, so a
    preflight reuses the checks the command would meet later) or `problems.add(message)`; `raise_if_any()` at the end.
    """

    def __init__(self, what: str = "the run could start") -> None:
        super().__init__()
        self.what, self.found = what, []

    def add(self, problem: str) -> None:
        if problem not in self.found:
            self.found.append(problem)

    @contextmanager
    def collect(self) -> Iterator[None]:
        try:
            yield
        except Problems as e:
            for problem in e.found:
                self.add(problem)
        except UserError as e:
            self.add(str(e))

    def raise_if_any(self) -> None:
        if self.found:
            raise self

    def __str__(self) -> str:
        n = len(self.found)
        lines = [f"{n} problem{'s' if n > 1 else ''} before {self.what} (nothing was written):"]
        return "\n".join(lines + [f"  {i}. {problem}" for i, problem in enumerate(self.found, 1)])
