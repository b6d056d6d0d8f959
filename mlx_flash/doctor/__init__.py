"""On-machine validation and timing of the Metal kernels: ``python -m mlx_flash.doctor``.

No Apple GPU compiled or ran these kernels while they were written (they
ran on the CPU emulator); a user's Mac is the first Metal device they meet,
with its own chip, macOS and Metal compiler. The doctor validates every
kernel there (``mlx_flash.validation``), times those that pass against
MLX's own op at fine-tuning shapes (``mlx_flash.bench.harness``), and writes
the verdict cache (``mlx_flash.verdicts``) that ``auto`` decides from.

``grid`` says what is validated and timed (and reads a model's shapes),
``checkup`` runs it and records the verdict, ``report`` writes the Markdown
report and ``cli`` is the command. From Python::

    import mlx_flash
    findings = mlx_flash.doctor(quick=True)
    print(findings)          # the Markdown report
"""

from typing import Optional, Sequence


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The command (``python -m mlx_flash.doctor``); returns its exit status."""
    from .cli import main as command

    return command(argv)


def doctor(
    quick: bool = False,
    full: bool = False,
    model: Optional[str] = None,
    recipe: Optional[str] = None,
    families: Optional[Sequence[str]] = None,
    dtypes: Optional[Sequence[str]] = None,
    head_dims: Optional[Sequence] = None,
    masks: Optional[Sequence[str]] = None,
    timing: bool = True,
    emulator: bool = False,
    out: Optional[str] = None,
):
    """Run the doctor (the arguments are the command's options) and return
    its ``Findings``; ``str()`` of them is the report, also written to
    ``out`` when given. Raises ``ValueError`` for bad arguments.

    ``head_dims`` are ints (``D = Dv``), ``(D, Dv)`` pairs or ``"DxDv"``
    strings.
    """
    from pathlib import Path

    from .. import verdicts
    from ..families import names as family_names
    from . import checkup, grid

    if quick and full:
        raise grid.DoctorError("quick and full exclude each other")
    if model and recipe:
        raise grid.DoctorError("model and recipe exclude each other")
    dims = None
    if head_dims:
        dims = [grid.parse_head_dims(str(d)) if not isinstance(d, (tuple, list)) else tuple(d) for d in head_dims]
    for name, given, allowed in (
        ("families", families, family_names()),
        ("dtypes", dtypes, ("float32", "float16", "bfloat16")),
        ("masks", masks, verdicts.MASK_KINDS),
    ):
        unknown = [x for x in given or () if x not in allowed]
        if unknown:
            raise grid.DoctorError(f"{name}: unknown {', '.join(map(str, unknown))}; choose from {', '.join(allowed)}")
    geometry = grid.from_model(model) if model else grid.from_recipe(recipe) if recipe else None
    findings = checkup.run(
        "quick" if quick else "full" if full else "default",
        geometry,
        families=families or family_names(),
        dtypes=dtypes,
        head_dims=dims,
        kinds=masks or verdicts.MASK_KINDS,
        timing=timing,
        emulated=emulator,
        command="mlx_flash.doctor()",
    )
    if out:
        path = Path(out).expanduser()
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(str(findings))
    return findings


__all__ = ["doctor", "main"]
