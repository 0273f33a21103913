"""``python -m nlnet`` is the ``nlnet`` command."""

import sys

from nlnet.cli import main

sys.exit(main())
