"""AdaMerging Table 1: CLIP ViT-B/32 merged on 8 tasks by every method (pretrained, individual, weight
averaging, task arithmetic, TIES, task-/layer-wise AdaMerging and AdaMerging++).

    adamerging-jax paper table1 --tfds-dir ~/tensorflow_datasets --output runs/table1
"""
import sys

from adamerging_jax.cli import main

if __name__ == "__main__":
    sys.exit(main(["paper", "table1", *sys.argv[1:]]))
