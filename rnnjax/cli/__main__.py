"""``python -m rnnjax.cli``: the ``rnnjax`` command."""

import sys

from rnnjax.cli import main

sys.exit(main())
