"""``python -m lmsurgeon.cli``: the same entry point as the console script."""

import sys

from lmsurgeon.cli import main

sys.exit(main())
