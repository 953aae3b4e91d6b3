"""edgepack: one small language model in, an artifact for every edge out, each one proven."""

__version__ = "0.1.0"
