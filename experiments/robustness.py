"""AdaMerging robustness: merge Cars, EuroSAT, RESISC45, GTSRB; adapt and evaluate on their test sets under
the 7 corruptions (and clean).

    python experiments/robustness.py --tfds-dir ~/tensorflow_datasets --output runs/robustness
"""
import sys

from adamerging_jax.paper.cli import robustness

if __name__ == "__main__":
    sys.exit(robustness(sys.argv[1:]))
