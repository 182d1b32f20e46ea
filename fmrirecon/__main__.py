import sys

from fmrirecon.cli import main

sys.exit(main())
