"""``python -m hbfp_hw``: the ``hbfp-hw`` command line."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
