"""`python -m transferkit.demo`: the offline quickstart (`make demo`); with `--data-only`, just
the example digits the shipped recipes read (under data/digits, or the folder given after it)."""

import sys

from transferkit.demo.digits import write_examples
from transferkit.demo.quickstart import main

if sys.argv[1:2] == ["--data-only"]:
    write_examples(*sys.argv[2:3])
else:
    main()
