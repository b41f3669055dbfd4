"""``python -m bluezsim`` — same as ``doorstep sim``."""

import sys

from bluezsim.cli import main

sys.exit(main())
