"""AdaMerging robustness: merge Cars, EuroSAT, RESISC45, GTSRB; adapt and evaluate on their test sets under
the 7 corruptions (and clean).

    adamerging-jax paper robustness --tfds-dir ~/tensorflow_datasets --output runs/robustness
"""
import sys

from adamerging_jax.cli import main

if __name__ == "__main__":
    sys.exit(main(["paper", "robustness", *sys.argv[1:]]))
