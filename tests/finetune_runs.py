"""What the fine-tuning tests share: the quickstart recipe at a few iterations,
a fresh model cache, and running the command as a user would."""

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "recipes" / "quickstart.yaml"

# Small and quick: a few iterations of the quickstart recipe.
FAST = [
    "--set", "iters=8",
    "--set", "batch_size=4",
    "--set", "max_seq_length=64",
    "--set", "steps_per_eval=4",
    "--set", "val_batches=2",
    "--set", "save_every=4",
    "--set", "learning_rate=3e-3",
]  # fmt: skip

# One variant: the runs of the resume and error tests need no comparison.
ONE = ["--set", "attention.compare=[]", "--set", "attention.variant=manual"]


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory):
    """Built-in models go to a fresh cache for the module (and its subprocesses)."""
    root = tmp_path_factory.mktemp("mlx_flash_cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLX_FLASH_CACHE", str(root))
        yield root


def cli(*args, cwd=None, timeout=180, env=None, **kwargs):
    """Run the command in a fresh interpreter, as a user would.

    It runs outside the source tree by default: ``python -m`` puts the working
    folder first on ``sys.path``, and in an unpacked sdist the bare source
    (``recipes/`` and ``metal/`` not yet mapped into the package) would shadow
    the installed package.
    """
    env = dict(os.environ if env is None else env, PYTHONUNBUFFERED="1")
    return subprocess.run(
        [sys.executable, "-m", "mlx_flash.finetune", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd or tempfile.gettempdir(),
        env=env,
        timeout=timeout,
        **kwargs,
    )


def read_records(path: Path):
    lines = Path(path).read_text().splitlines()
    return [json.loads(line) for line in lines]


def one_error_line(stderr: str) -> str:
    """The single line a bad input prints, asserting it is one line and no traceback."""
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("mlx_flash.finetune: error: "), stderr
    return lines[0]


def last_error_line(stderr: str) -> str:
    """The error of a run that had started (after its progress lines): one line,
    the last, and no traceback."""
    assert "Traceback" not in stderr, stderr
    lines = stderr.strip().splitlines()
    assert [line for line in lines if line.startswith("mlx_flash.finetune: error: ")] == lines[-1:], stderr
    return lines[-1]
