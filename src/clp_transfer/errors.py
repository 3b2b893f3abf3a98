"""User-facing errors.

Every error a user can fix (bad path, incompatible models, existing output, ...) is a :class:`ClpError`.
The CLI prints its message without a traceback and exits with status 2; library users can catch it.
"""

from __future__ import annotations


class ClpError(Exception):
    """An error caused by the user's input or environment, with a message that says how to fix it."""


class NonFiniteEmbeddingsError(ClpError):
    """A transfer method produced inf/NaN rows for these inputs (e.g. the published CLP rule dividing by a
    near-zero sum of cosines): the method cannot build a model here, nothing is written."""


class UnknownNameError(ClpError, KeyError):
    """A name that is not in a registry (methods, tasks, presets)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""
