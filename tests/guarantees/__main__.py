"""`python -m tests.guarantees`: the soak command (see `soak.py`)."""

import sys

from .soak import main

sys.exit(main())
