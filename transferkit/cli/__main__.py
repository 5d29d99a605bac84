"""`python -m transferkit.cli ...` (what torchrun and `accelerate launch -m` run)."""

import sys

from transferkit.cli import main

sys.exit(main())
