"""`UserError`: the base of every error that is the user's input, not a bug in this project.

Each command (`python -m train`, `train.export`, `train.compare`, `distill.build`, `data_pipes.shards.make`) catches
it once and prints its message, which names the problem and the fix, without a stack trace; anything else is a bug
and keeps its traceback. It lives in the lowest layer (data) so that every package can derive its errors from it.
"""

from __future__ import annotations


class UserError(Exception):
    """Bad input (a path, a setting, a file that is not ours); the message says what is wrong and how to fix it."""
