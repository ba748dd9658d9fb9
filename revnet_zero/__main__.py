"""``python -m revnet_zero``: the same as the ``revnet`` command."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
