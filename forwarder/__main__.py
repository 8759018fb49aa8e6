"""`python -m forwarder` is the `forwarder` command."""

from __future__ import annotations

import sys

from forwarder.cli.main import main

sys.exit(main())
