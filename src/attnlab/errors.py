"""The errors attnlab raises about what it was given.

:class:`AttnlabInputError` is a ``ValueError`` (so a caller's ``except ValueError`` still catches it) that
says the *input* is wrong: a shape, a value, an option combination, a file the user named. The command line
prints it as one line on stderr and exits with code 2. :class:`AttnlabInputTypeError` is the same for an
argument of the wrong type, and is also a ``TypeError``. Anything else that escapes is a bug in attnlab:
the command line says so, asks for a report and exits with code 3 (the traceback with ``--debug`` or
``ATTNLAB_DEBUG=1``).

This module imports nothing from attnlab, so every module may import it.
"""

from __future__ import annotations

__all__ = ["AttnlabInputError", "AttnlabInputTypeError"]


class AttnlabInputError(ValueError):
    """The input is wrong (a shape, a value, a combination of options, a file): the message names the
    argument, what was expected and what was given."""


class AttnlabInputTypeError(AttnlabInputError, TypeError):
    """An argument of the wrong type: an :class:`AttnlabInputError` that is also a ``TypeError``."""
