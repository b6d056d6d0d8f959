"""``python -m mlx_flash.plan.table``: the README's table of the longest trainable row per model and Mac.

For each shipped model (its usual MLX checkpoint: bfloat16, or 4-bit where
the config says so), one packed row per step, LoRA rank 8 on every block,
and Macs of 8, 16, 32 and 64 GB at Metal's default working set: the longest
row stock mlx-lm fits (without and with ``grad_checkpoint``) beside
mlx-flash with every option on.
"""

import argparse
import sys

from . import memory
from .budget import mac_working_set
from .memory import MODES, Setup
from .models import known_models, resolve

MACS = (8, 16, 32, 64)
COLUMNS = ("stock", "stock+ckpt", "all")


def _tokens(n: int) -> str:
    if n == 0:
        return "-"
    return f"{n / 1024:.0f}k" if n >= 10240 else f"{n / 1024:.1f}k"


def rows(macs=MACS):
    for name in known_models():
        g = resolve(name)
        cells = []
        for gb in macs:
            budget = mac_working_set(gb)
            cells.append([memory.max_length(g, Setup(seq=1), MODES[c], budget) for c in COLUMNS])
        yield name, g, cells


def markdown(macs=MACS) -> str:
    head = "| model | weights | " + " | ".join(f"{gb} GB Mac" for gb in macs) + " |"
    lines = [head, "|---|---|" + "---|" * len(macs)]
    for name, g, cells in rows(macs):
        weights = f"{g.bits}-bit" if g.bits else g.dtype
        text = [" / ".join(_tokens(n) for n in cell) for cell in cells]
        lines.append(f"| {name} | {weights}, {g.weights_bytes / 2**30:.1f} GiB | " + " | ".join(text) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mlx_flash.plan.table", description=__doc__.split("\n")[0])
    parser.parse_args(argv)
    print(f"tokens per row: {' / '.join(COLUMNS)} (k = 1024 tokens; - = the weights alone do not fit)")
    print(markdown())
    return 0


if __name__ == "__main__":
    sys.exit(main())
