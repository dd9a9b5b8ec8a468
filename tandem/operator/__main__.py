"""`python -m tandem.operator [args]` runs the operator, like `tandem operator run [args]`."""

import sys

from tandem import commands
from tandem.operator.cli import register

raise SystemExit(commands.run(commands.parser_with(register), ["operator", "run", *sys.argv[1:]]))
