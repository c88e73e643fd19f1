import sys

from retinanet.cli import main

sys.exit(main())
