"""`python -m ivip_ipc_async` runs the `ivip-ipc` command."""

import sys

from .cli import main

sys.exit(main())
