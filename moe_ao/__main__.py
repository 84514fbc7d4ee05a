"""``python -m moe_ao``: the moe-ao command line."""

import sys

from moe_ao.cli import main

sys.exit(main())
