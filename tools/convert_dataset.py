"""`retinanet convert-dataset` as a script (for torchrun and a checkout): `-h` lists its options."""

import sys

from retinanet.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert-dataset", *sys.argv[1:]]))
