"""Flax models whose parameters are plain pytrees, each with its checkpoint converter beside it."""
