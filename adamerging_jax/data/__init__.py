"""Data sources (packaged datasets, local folders, tensorflow-datasets) and the input pipeline."""
