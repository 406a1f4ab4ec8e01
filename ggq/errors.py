"""The one root of ggq's errors.

Every module's error (CheckpointError, ConvertError, QuantError, ...) derives from ``GGQError``
and keeps its own second base (ValueError for bad input, RuntimeError for a build or a tool that
failed), so ``except ValueError`` still catches it. Each message names the file, option, tensor
or value at fault; the CLI prints it as one line and exits with status 2, whichever module raised
it (tests/test_errors.py walks the package to keep it so).
"""

from __future__ import annotations


class GGQError(Exception):
    """Input or an environment ggq cannot use; the message says what and where."""
