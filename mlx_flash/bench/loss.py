"""The loss alone: peak memory and time of the chunked linear cross-entropy
against the full-logits path, at one shape.

One measurement is the loss of hidden states ``(1, L, D)`` through a frozen
``(V, D)`` head and its gradient with respect to the hidden states (what a
LoRA step asks of the loss), evaluated once:

- ``full``: ``nn.losses.cross_entropy(h @ W.T, targets)``, as mlx-lm's
  ``default_loss`` computes it;
- ``chunked``: ``mlx_flash.losses.linear_cross_entropy`` with its default
  chunks;
- ``recompute`` (``--one`` only): the same with ``recompute=True``, which
  keeps only the log-sum-exp and recomputes the logits in the backward.

Each path runs in a fresh interpreter, so that one's allocations and cache
never count in the other's peak; the peak is ``mx.get_peak_memory()`` minus
the memory held by the inputs. ``compare`` returns both, their ratios and
the targets (peak at most 3% of the full path's, time at most 1.2x).

    python -m mlx_flash.bench.loss --length 8192 --vocab 151936 --dims 1536

The full path needs several ``L x V`` float32 arrays (4.6 GiB each at the
default shape): run it where that much memory is free.
"""

import argparse
import json
import subprocess
import sys
import time

PEAK_TARGET = 0.03
TIME_TARGET = 1.2
PATHS = ("full", "chunked", "recompute")


def measure_one(path: str, length: int, vocab: int, dims: int, dtype: str = "float32", seed: int = 0) -> dict:
    """Peak memory above the inputs, time and the results' checksums of one
    path, in this process."""
    import mlx.core as mx
    import mlx.nn as nn

    from ..losses import LinearHead, linear_cross_entropy

    if path not in PATHS:
        raise ValueError(f"path must be one of {', '.join(PATHS)}, got {path!r}")
    dt = getattr(mx, dtype)
    mx.random.seed(seed)
    h = mx.random.normal((1, length, dims)).astype(dt)
    w = (mx.random.normal((vocab, dims)) / dims**0.5).astype(dt)
    t = mx.random.randint(0, vocab, (1, length))
    mx.eval(h, w, t)
    head = LinearHead(w, trainable=frozenset())

    def full(h):
        return nn.losses.cross_entropy((h @ w.T).astype(mx.float32), t).sum()

    def chunked(h):
        return linear_cross_entropy(h, head, t, recompute=path == "recompute").sum()

    fn = mx.value_and_grad(full if path == "full" else chunked)
    mx.synchronize()
    mx.clear_cache()
    mx.reset_peak_memory()
    base = mx.get_active_memory()
    tic = time.perf_counter()
    loss, grad = fn(h)
    mx.eval(loss, grad)
    seconds = time.perf_counter() - tic
    peak = mx.get_peak_memory() - base
    g = grad.astype(mx.float32)
    return {
        "path": path,
        "length": length,
        "vocab": vocab,
        "dims": dims,
        "dtype": dtype,
        "peak_above_inputs_bytes": int(peak),
        "inputs_bytes": int(base),
        "seconds": seconds,
        "loss": loss.item(),
        "grad_sum": mx.sum(g).item(),
        "grad_abs_sum": mx.sum(mx.abs(g)).item(),
    }


def _in_fresh_process(path: str, length: int, vocab: int, dims: int, dtype: str) -> dict:
    command = [sys.executable, "-m", "mlx_flash.bench.loss", "--one", path, "--length", str(length),
               "--vocab", str(vocab), "--dims", str(dims), "--dtype", dtype]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{path} loss at L={length}: exit {done.returncode}: {done.stderr.strip()[-500:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def compare(length: int = 8192, vocab: int = 151936, dims: int = 1536, dtype: str = "float32",
            progress=print) -> dict:  # fmt: skip
    """Both paths, each in a fresh interpreter, and the verdicts."""
    runs = {}
    for path in ("full", "chunked"):
        progress(f"loss alone: {path} at L={length} V={vocab} D={dims} {dtype} ...")
        runs[path] = _in_fresh_process(path, length, vocab, dims, dtype)
        r = runs[path]
        progress(f"  peak above inputs {r['peak_above_inputs_bytes'] / 2**20:.1f} MiB, {r['seconds']:.1f} s")
    full, ours = runs["full"], runs["chunked"]
    peak_ratio = ours["peak_above_inputs_bytes"] / full["peak_above_inputs_bytes"]
    time_ratio = ours["seconds"] / full["seconds"]
    same = abs(ours["loss"] - full["loss"]) <= 1e-5 * abs(full["loss"]) and abs(
        ours["grad_abs_sum"] - full["grad_abs_sum"]
    ) <= 1e-4 * abs(full["grad_abs_sum"])
    return {
        "full": full,
        "chunked": ours,
        "peak_ratio": peak_ratio,
        "time_ratio": time_ratio,
        "same_loss_and_gradient": same,
        "peak_target": PEAK_TARGET,
        "time_target": TIME_TARGET,
        "peak_pass": peak_ratio <= PEAK_TARGET,
        "time_pass": time_ratio <= TIME_TARGET,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mlx_flash.bench.loss",
        description="Peak memory and time of the chunked linear cross-entropy against full logits (loss and "
        "its gradient with respect to the hidden states, frozen head), each path in a fresh process.",
    )
    parser.add_argument("--length", type=int, default=8192, help="tokens L (default 8192)")
    parser.add_argument("--vocab", type=int, default=151936, help="vocabulary V (default 151936, Qwen2.5)")
    parser.add_argument("--dims", type=int, default=1536, help="hidden size D (default 1536, Qwen2.5-1.5B)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"), help="dtype")
    parser.add_argument("--one", choices=PATHS, help="measure one path in this process and print its JSON")
    parser.add_argument("--json", help="also write the comparison to this file")
    args = parser.parse_args(argv)
    for name in ("length", "vocab", "dims"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    if args.one:
        print(json.dumps(measure_one(args.one, args.length, args.vocab, args.dims, args.dtype)))
        return 0
    result = compare(args.length, args.vocab, args.dims, args.dtype, progress=lambda s: print(s, file=sys.stderr))
    verdict = lambda ok: "PASS" if ok else "FAIL"  # noqa: E731
    print(f"peak above inputs: chunked {result['chunked']['peak_above_inputs_bytes'] / 2**20:.1f} MiB, "
          f"full {result['full']['peak_above_inputs_bytes'] / 2**20:.1f} MiB: {100 * result['peak_ratio']:.2f}% "
          f"(target <= {100 * PEAK_TARGET:.0f}%) {verdict(result['peak_pass'])}")  # fmt: skip
    print(f"time: chunked {result['chunked']['seconds']:.1f} s, full {result['full']['seconds']:.1f} s: "
          f"{result['time_ratio']:.2f}x (target <= {TIME_TARGET}x) {verdict(result['time_pass'])}")  # fmt: skip
    print(f"same loss and gradient: {result['same_loss_and_gradient']}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
