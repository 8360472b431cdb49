"""diagvid: real-time streaming video generation with Diagonal Distillation."""

__version__ = "0.1.0"
