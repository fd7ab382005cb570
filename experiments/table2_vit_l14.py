"""AdaMerging Table 2: the same methods on CLIP ViT-L/14.

    python experiments/table2_vit_l14.py --tfds-dir ~/tensorflow_datasets --output runs/table2
"""
import sys

from adamerging_jax.paper.cli import table2

if __name__ == "__main__":
    sys.exit(table2(sys.argv[1:]))
