"""AdaMerging generalization: merge 6 seen tasks, evaluate on them and on 2 unseen tasks (both splits of
the paper).

    adamerging-jax paper generalization --tfds-dir ~/tensorflow_datasets --output runs/generalization
"""
import sys

from adamerging_jax.cli import main

if __name__ == "__main__":
    sys.exit(main(["paper", "generalization", *sys.argv[1:]]))
