"""The metrics tests: real `tandem serve` processes scraped by a real Prometheus (no cluster needed).

They reuse tests/e2e's Prometheus and port helpers, which need no cluster either.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "e2e"))
