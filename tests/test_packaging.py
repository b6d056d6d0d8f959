"""The distribution: the sdist carries its own tests and all they read, the
wheel its data files and licence, and neither build warns."""

import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def build(kind: str, out: Path) -> Path:
    result = subprocess.run(
        [sys.executable, "-m", "build", f"--{kind}", "--no-isolation", "--outdir", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    log = result.stdout + result.stderr
    # setuptools' deprecation notices come framed in '!!' lines.
    for sign in ("Deprecat", "!!", "is absent from the `packages`"):
        assert sign not in log, log[log.find(sign) - 500 : log.find(sign) + 500]
    (artifact,) = out.iterdir()
    return artifact


@pytest.fixture(scope="module")
def sdist(tmp_path_factory) -> set:
    path = build("sdist", tmp_path_factory.mktemp("sdist"))
    with tarfile.open(path) as tar:
        root = tar.getnames()[0].split("/")[0]
        return {name[len(root) + 1 :] for name in tar.getnames()}


def test_sdist_holds_the_tests_and_what_they_read(sdist):
    wanted = ["LICENSE", "Makefile", "pyproject.toml", "README.md", "mlx_flash/bench/targets.yaml"]
    wanted += [str(p.relative_to(REPO)) for p in (REPO / "tests").glob("*.py")]
    wanted += [str(p.relative_to(REPO)) for p in (REPO / "recipes").rglob("*") if p.suffix in (".yaml", ".jsonl")]
    wanted += [str(p.relative_to(REPO)) for p in (REPO / "metal").glob("*") if p.suffix in (".metal", ".h")]
    wanted += [str(p.relative_to(REPO)) for p in (REPO / "bench").rglob("*") if p.suffix in (".md", ".json")]
    assert "tests/kernel_checks.py" in wanted and "tests/finetune_runs.py" in wanted
    missing = sorted(set(wanted) - sdist)
    assert not missing


def test_wheel_holds_data_and_licence(tmp_path):
    path = build("wheel", tmp_path)
    with zipfile.ZipFile(path) as wheel:
        names = set(wheel.namelist())
        metadata = next(wheel.read(n).decode() for n in names if n.endswith(".dist-info/METADATA"))
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert "License-Expression: MIT" in metadata
    for name in ("mlx_flash/bench/targets.yaml", "mlx_flash/recipes/quickstart.yaml",
                 "mlx_flash/recipes/data/train.jsonl", "mlx_flash/metal/practical_forward.metal"):  # fmt: skip
        assert name in names, name
