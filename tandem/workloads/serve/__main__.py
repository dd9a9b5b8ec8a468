"""`python -m tandem.workloads.serve ...` is `tandem serve ...`."""

import sys

from tandem.workloads.serve.cli import main

sys.exit(main())
