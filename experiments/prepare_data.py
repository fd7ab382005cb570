"""Prepare the paper's 8 test sets as tfds ArrayRecord datasets (no tensorflow needed).

    python experiments/prepare_data.py --data-dir ~/tensorflow_datasets --manual-dir ~/manual
"""
import sys

from adamerging_jax.paper.cli import prepare_data

if __name__ == "__main__":
    sys.exit(prepare_data(sys.argv[1:]))
