"""kdcache: distil ViTPose into small pose networks from a cached teacher pass."""

__version__ = "0.1.0"
