"""matplotlib, optional: the one place that imports it (``pip install -e ".[viz]"``)."""

from __future__ import annotations

from typing import Any

from ssl_xcit.errors import UserError


def pyplot(command: str) -> Any:
    """``matplotlib.pyplot`` drawing to files (no screen needed).

    Raises:
        UserError: matplotlib is not installed, naming ``command`` and the install line.
    """
    try:
        import matplotlib
    except ImportError as err:
        raise UserError(f"{command} draws with matplotlib, which is not installed: pip install -e \".[viz]\" "
                        "(or pip install matplotlib)") from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
