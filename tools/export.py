"""`retinanet export` as a script (for torchrun and a checkout): `-h` lists its options."""

import sys

from retinanet.cli import main

if __name__ == "__main__":
    sys.exit(main(["export", *sys.argv[1:]]))
