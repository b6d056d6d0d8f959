"""Runs MLX-generated Metal kernel source on the CPU (being built)."""


def is_active() -> bool:
    return False


def active_schedule():
    return "forward"
