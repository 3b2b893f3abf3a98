"""Figures are optional: matplotlib is the ``plots`` extra (``pip install 'clp-transfer[plots]'``)."""

from __future__ import annotations

import logging
from typing import Any

from .errors import ClpError

log = logging.getLogger(__name__)


def pyplot(purpose: str) -> Any:
    """``matplotlib.pyplot`` on the file-only Agg backend; a :class:`ClpError` that names the extra to
    install when matplotlib is missing (``purpose`` says what the figure is for)."""
    try:
        import matplotlib
    except ImportError:
        raise ClpError(f"{purpose} needs matplotlib: pip install 'clp-transfer[plots]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def optional_pyplot(purpose: str) -> Any | None:
    """As :func:`pyplot`, but ``None`` with a warning when matplotlib is missing (for figures a run adds to
    its outputs, which must not fail the run)."""
    try:
        return pyplot(purpose)
    except ClpError as e:
        log.warning("%s; skipped", e)
        return None
