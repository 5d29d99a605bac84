"""`fit`'s choices that the command line shows in its help (no torch to import for them)."""

FIT_METHODS = ("probe", "lp-ft", "full")  # linear probe, LP-FT, full fine-tuning
DEFAULT_BUDGET_MINUTES = 10.0  # the search, its trials and the chosen run, on this machine
