"""``python -m flows.cli``: the ``digitflow`` command without the installed script."""

import sys

from flows.cli import main

sys.exit(main())
