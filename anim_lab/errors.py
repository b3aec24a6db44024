"""The project's own errors: what a user can fix, told in words that say what was wrong and what to do.

Every deliberate refusal in the library raises an :class:`AnimLabError`. Most are :class:`InputError`, which
is also a ``ValueError`` (so ``except ValueError`` keeps working): a bad argument, a file whose content does
not fit, a setting out of range. The command line (``anim_lab.cli``) shows these as one-line messages; any
other exception is a bug, shown as one, with ``--debug`` for the traceback.

    AnimLabError
    |-- InputError (ValueError)
    |   |-- files.OutputError         a destination the program refuses or cannot write
    |   |-- weights.CorruptWeightsError, weights.UnsafeWeightsError, weights.KeyMismatchError
    |   `-- landmarks.NoFaceError     no face where one is needed
    |-- pipelines.NonFiniteError (ValueError)   NaN or inf appeared while generating
    `-- cli.CliError                  a command-line option that does not fit
"""

from __future__ import annotations

__all__ = ["AnimLabError", "InputError"]


class AnimLabError(Exception):
    """Base class of every error anim_lab raises on purpose."""


class InputError(AnimLabError, ValueError):
    """A value, file or setting the user gave that cannot be used; the message names it and the fix."""
