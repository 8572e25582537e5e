"""``python -m fategen serve``: the same as the ``fategen`` console script."""

import sys

from fategen.cli import main

sys.exit(main())
