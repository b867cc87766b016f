"""``python -m OAIMSSegment``: the command line (see :mod:`OAIMSSegment.cli`)."""

import sys

from OAIMSSegment.cli import main

if __name__ == "__main__":
    sys.exit(main())
