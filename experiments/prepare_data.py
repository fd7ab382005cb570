"""Prepare the paper's 8 test sets as tfds ArrayRecord datasets (no tensorflow needed).

    adamerging-jax paper prepare-data --data-dir ~/tensorflow_datasets --manual-dir ~/manual
"""
import sys

from adamerging_jax.cli import main

if __name__ == "__main__":
    sys.exit(main(["paper", "prepare-data", *sys.argv[1:]]))
