"""`python -m tandem.operator [args]` runs the operator, like `tandem operator run [args]`."""

import sys

from tandem.cli import main

raise SystemExit(main(["operator", "run", *sys.argv[1:]]))
