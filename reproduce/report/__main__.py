"""python -m reproduce.report: the same as `reproduce report`."""

import sys

from reproduce.report.command import main

sys.exit(main())
