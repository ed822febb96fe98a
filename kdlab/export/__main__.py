"""``python -m kdlab.export``: see :mod:`kdlab.export.cli`."""
import sys

from kdlab.export.cli import main

sys.exit(main())
