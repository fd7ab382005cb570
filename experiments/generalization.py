"""AdaMerging generalization: merge 6 seen tasks, evaluate on them and on 2 unseen tasks (both splits of
the paper).

    python experiments/generalization.py --tfds-dir ~/tensorflow_datasets --output runs/generalization
"""
import sys

from adamerging_jax.paper.cli import generalization

if __name__ == "__main__":
    sys.exit(generalization(sys.argv[1:]))
