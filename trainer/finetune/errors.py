"""The one exception type a user sees.

Every problem the user can fix (a missing file, a freeze depth too deep, a bad weights
file) is raised as ``FinetuneError`` with a message that names the problem and the fix.
The CLI prints ``error: <message>`` on one line and exits with ``EXIT_USAGE`` instead of
showing a traceback; the operator treats that exit code as permanent (no restart).
"""

from __future__ import annotations

EXIT_USAGE = 2
# A run stopped by SIGTERM after saving its position: 128 + SIGTERM, which the operator retries.
EXIT_STOPPED = 143


class FinetuneError(Exception):
    """A problem with the user's input, reported as one readable line."""


class Interrupted(Exception):
    """SIGTERM stopped the run after its position was saved in last.pt; ``--resume`` continues."""
