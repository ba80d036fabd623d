"""edgekv: unbounded-context LLMs on static-shape NPUs."""

__version__ = "0.1.0"
