"""The command line that runs Fraisier's tasks, for the commands that messages suggest."""

from __future__ import annotations

import os
import sys


def command_name() -> str:
    """Return ``fraisier`` when this process is the console script or ``python -m fraisier``.

    Otherwise the tasks run under Invoke in a checkout, and messages suggest ``inv``.
    """
    program = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    if program == "fraisier" or sys.argv[0].endswith(os.path.join("fraisier", "__main__.py")):
        return "fraisier"
    return "inv"
