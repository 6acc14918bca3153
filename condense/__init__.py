"""condense: reproducible dataset condensation by gradient matching."""

__version__ = "0.1.0"
