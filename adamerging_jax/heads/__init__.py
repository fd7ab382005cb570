"""Frozen classification heads: CLIP zero-shot heads and prototype heads."""
