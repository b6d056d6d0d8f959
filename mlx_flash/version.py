"""The version of mlx-flash (kept here so that any module can read it without
importing the package's face, ``mlx_flash/__init__.py``)."""

__version__ = "0.1.0"
