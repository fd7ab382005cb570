"""AdaMerging Table 2: the same methods on CLIP ViT-L/14.

    adamerging-jax paper table2 --tfds-dir ~/tensorflow_datasets --output runs/table2
"""
import sys

from adamerging_jax.cli import main

if __name__ == "__main__":
    sys.exit(main(["paper", "table2", *sys.argv[1:]]))
