"""``python -m kdlab.compare``: see :mod:`kdlab.compare.cli`."""
import sys

from kdlab.compare.cli import main

sys.exit(main())
