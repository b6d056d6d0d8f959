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
def sdist_path(tmp_path_factory) -> Path:
    return build("sdist", tmp_path_factory.mktemp("sdist"))


@pytest.fixture(scope="module")
def sdist(sdist_path) -> set:
    with tarfile.open(sdist_path) as tar:
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


def test_sdist_runs_its_own_tests(sdist_path, tmp_path):
    # Unpacked, the sdist's own tests run against its own package (the
    # unpacked folder comes first on sys.path): a few fast files, the
    # emulator's kernel tests among them.
    with tarfile.open(sdist_path) as tar:
        tar.extractall(tmp_path, filter="data")
    (tree,) = tmp_path.iterdir()
    where = subprocess.run([sys.executable, "-c", "import mlx_flash; print(mlx_flash.__file__)"],
                           cwd=tree, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert Path(where.stdout.strip()).is_relative_to(tree), where.stdout + where.stderr
    files = ["tests/test_structured_masks.py", "tests/test_cost.py", "tests/test_practical.py::test_forward_lazy_maximum_rescales_exactly"]
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *files],
                            cwd=tree, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert " passed" in result.stdout and "skipped" not in result.stdout


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
