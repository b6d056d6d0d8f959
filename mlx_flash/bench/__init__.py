"""Benchmarks of the attention variants: ``python -m mlx_flash.bench``.

``harness`` checks and measures cells, ``targets`` evaluates declared
targets, ``report`` writes Markdown, JSON, CSV and plots, and ``cli`` ties
them together; ``mlx_flash.machine`` says what hardware it all ran on.
"""

from .cli import main

__all__ = ["main"]
