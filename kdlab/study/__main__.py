"""``python -m kdlab.study``: see :mod:`kdlab.study.cli`."""
import sys

from kdlab.study.cli import main

sys.exit(main())
