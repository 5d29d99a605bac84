"""The offline quickstart (`make demo`, `python -m transferkit.demo`) and its data: the real
handwritten digits that scikit-learn ships, written as PNG files with CSV manifests."""

from transferkit.demo.digits import (
    write_digits,
    write_examples,
    write_few_labels,
    write_overlaid_digits,
)
from transferkit.demo.quickstart import digits_chain, main

__all__ = [
    "digits_chain",
    "main",
    "write_digits",
    "write_examples",
    "write_few_labels",
    "write_overlaid_digits",
]
