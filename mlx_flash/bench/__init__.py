"""Benchmarks of the attention variants: ``python -m mlx_flash.bench``.

``harness`` checks and measures cells, ``targets`` evaluates declared
targets, ``report`` writes Markdown, JSON, CSV and plots, ``machine`` says
what hardware it all ran on, and ``cli`` ties them together.
"""

from .cli import main

__all__ = ["main"]
