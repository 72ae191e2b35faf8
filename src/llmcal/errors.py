"""The one error type library code raises for problems a user can fix.

The CLI maps it to exit status 2 and prints its message; anything else is a bug.
"""
from __future__ import annotations


class LlmcalError(Exception):
    """A problem with the user's input, model, data or run directory.

    The message must say what is wrong and where (file, line/row, question id),
    so that a user can act on it without reading a traceback.
    """

    exit_code = 2
