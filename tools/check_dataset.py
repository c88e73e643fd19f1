"""`retinanet check-dataset` as a script (for a checkout): `-h` lists its options."""

import sys

from retinanet.cli import main

if __name__ == "__main__":
    sys.exit(main(["check-dataset", *sys.argv[1:]]))
