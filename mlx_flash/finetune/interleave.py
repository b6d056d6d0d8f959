"""A comparison of attention variants that holds still on a busy machine.

The variants of a comparison train side by side in one process, in turns of
a few iterations each (A B C A B C ...). Each turn is a *window*; a change in
the machine's load (another job starting, a CPU warming up) then falls on
every variant alike, instead of on whichever ran last, and the report
compares the variants window by window: each ratio is the median and the
range over windows (report.py).

Each run keeps its own random stream (LoRA dropout), attention patch,
metrics and checkpoints, so its losses, adapters and resume points are those
of the run trained alone. Only its peak memory needs care: the other runs'
weights and optimizer states are resident too, and are left out of it.
"""

import math
import os
import sys
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import List, Optional, Tuple

from mlx.utils import tree_flatten

from ..patch import patched
from ..step import bounded
from . import interrupts, resume, train

#: Turns per variant over a whole run (a window is ``iters / WINDOWS`` iterations).
WINDOWS = 8


def window_size(iters: int) -> int:
    """Iterations per turn: about ``WINDOWS`` turns over ``iters``."""
    return max(1, math.ceil(iters / WINDOWS))


def load_average() -> Optional[float]:
    """The machine's 1-minute load average, or None where there is none."""
    try:
        return round(os.getloadavg()[0], 2)
    except (OSError, AttributeError):
        return None


def resident_bytes(run: train.Run) -> int:
    """Bytes of a run's model weights, optimizer state and pending gradients."""
    trees = [run.model.parameters(), run.optimizer.state, run.grad or {}]
    return sum(v.nbytes for tree in trees for _, v in tree_flatten(tree) if hasattr(v, "nbytes"))


class _Turns:
    """Whose turn it is: puts a run's random key and attention patch in place."""

    def __init__(self):
        self.keys = {}

    @contextmanager
    def of(self, run: train.Run):
        resume.set_random_key(self.keys[id(run)])
        if run.progress is not None:
            run.progress.resume()
        try:
            with patched(run.variant):
                yield
        finally:
            self.keys[id(run)] = resume.random_key()
            if run.progress is not None:
                run.progress.pause()


def compare(recipe, runs: List[Tuple[str, Path]]) -> List[dict]:
    """Fine-tune every ``(attention.compare entry, run folder)`` of ``runs``,
    interleaved window by window; returns their summaries (rank 0).

    Raises ``train.Interrupted`` when Ctrl-C or SIGTERM stops the comparison:
    every run saves a checkpoint of the iterations it finished.
    """
    jobs, turns = [], _Turns()
    for entry, run_dir in runs:
        job = train.set_up(recipe, entry, run_dir)
        train.resume_from(job)
        jobs.append(job)
        # set_up seeds the random stream afresh: each run's own stream starts here.
        turns.keys[id(job)] = resume.random_key()
    sizes = [resident_bytes(job) for job in jobs]
    for job, size in zip(jobs, sizes):
        job.others_bytes = sum(sizes) - size
    width = window_size(recipe.iters)
    writer = jobs[0].writer
    if writer:
        print(
            f"comparing {len(jobs)} variants in turns of {width} iteration(s) (A B C A B C ...), "
            f"so that load on the machine falls on each alike; load average {load_average()}",
            file=sys.stderr,
        )
    loads: List[Optional[float]] = []
    summaries = []
    with ExitStack() as bounds:
        for job in jobs:
            bounds.enter_context(bounded(job.model, checkpoint=recipe.grad_checkpoint, chunk_tokens=recipe.chunk_tokens))
        try:
            notice, at_once = train.stop_notices(jobs)
            with interrupts.deferred(notice if writer else None, at_once) as request:
                for job in jobs:
                    with turns.of(job):
                        train.begin(job)
                first = min(job.start for job in jobs)
                stopped = train.stop_requested(jobs[0], request)
                low = 1 + (first - 1) // width * width
                while not stopped and low <= recipe.iters:
                    loads.append(load_average())
                    for job in jobs:
                        with turns.of(job):
                            for iteration in range(max(low, job.start), min(low + width, recipe.iters + 1)):
                                train.one_iteration(job, iteration)
                                stopped = train.stop_requested(job, request)
                                if stopped:
                                    break
                        if stopped:
                            break
                    low += width
                if stopped:
                    for job in jobs:
                        with turns.of(job):
                            train.stop(job, request.signal)
            if not stopped:
                for job in jobs:
                    with turns.of(job):
                        train.finish(job)
        except KeyboardInterrupt as e:
            for job in jobs:
                job.stopped, job.at_once = interrupts.signal_of(e), True
        finally:
            for job in jobs:
                if job.progress is not None:
                    job.progress.close()
                if job.writer:
                    job.extra["interleaved"] = {"window_iterations": width, "load_average_1min": loads}
                    summaries.append(train.write_summary(job))
    if any(job.stopped is not None for job in jobs):
        raise train.Interrupted(stopped_message(jobs), next(j.stopped for j in jobs if j.stopped is not None))
    return summaries


def stopped_message(jobs: List[train.Run]) -> str:
    """One line: where each run of the comparison stopped, and how to go on."""
    job = jobs[0]
    name = interrupts.NAMES[job.stopped]
    if job.at_once:
        kept = ", ".join(f"{j.entry} at iteration {j.saved_iteration}" for j in jobs)
        return f"{name}: stopped at once; the last checkpoints are {kept}, and metrics were cut back to them"
    if all(j.done == 0 for j in jobs):
        return f"{name}: stopped before iteration 1, during the {train.in_progress(jobs).phase}: nothing was trained or saved"
    done = ", ".join(f"{j.entry} after iteration {j.done}" for j in jobs)
    return (
        f"{name}: stopped {done}, each with a checkpoint, adapters and summary in its folder under "
        f"{job.run_dir.parent}; --set resume=true continues"
    )
