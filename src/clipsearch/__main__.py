"""`python -m clipsearch` (also the file to hand to `spark-submit`)."""

import sys

from clipsearch.cli import main

if __name__ == "__main__":
    sys.exit(main())
