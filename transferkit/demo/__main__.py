"""`python -m transferkit.demo`: the offline quickstart (`make demo`)."""

from transferkit.demo.quickstart import main

main()
