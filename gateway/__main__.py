"""``python -m gateway`` is the ``gateway`` command."""

import os
import signal
import sys

if "GATEWAY_WORKER" in os.environ:
    # A worker (gateway.workers) still importing must not die of its supervisor's SIGHUP:
    # it reads the current config as it starts anyway. serve() installs the real handler.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)

from gateway.cli import main  # noqa: E402 - after the signal disposition, on purpose

sys.exit(main())
