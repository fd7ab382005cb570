"""AdaMerging Table 1: CLIP ViT-B/32 merged on 8 tasks by every method (pretrained, individual, weight
averaging, task arithmetic, TIES, task-/layer-wise AdaMerging and AdaMerging++).

    python experiments/table1_vit_b32.py --tfds-dir ~/tensorflow_datasets --output runs/table1
"""
import sys

from adamerging_jax.paper.cli import table1

if __name__ == "__main__":
    sys.exit(table1(sys.argv[1:]))
