"""The offline real benchmark (`adamerging-jax demo`): ImageNet EfficientNet-Lite0 merged over real tasks."""

from adamerging_jax.demo.pipeline import METHODS, DemoConfig, run_demo

__all__ = ["METHODS", "DemoConfig", "run_demo"]
