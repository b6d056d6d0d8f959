"""Errors the emulator reports about a kernel."""


class EmulatorError(RuntimeError):
    """Base class of the emulator's errors."""


class CompilerNotFoundError(EmulatorError):
    """No C++ compiler to build kernels with."""


class CompileError(EmulatorError):
    """The kernel source does not compile as Metal (compiler message and the
    generated source lines around the error)."""


class RaceError(EmulatorError):
    """Results differ between thread schedules: a data race."""


class DivergenceError(EmulatorError):
    """A barrier or SIMD collective that not every thread reaches."""


class StrictError(EmulatorError):
    """The kernel source breaks a rule of Metal that Apple's compiler
    enforces (address spaces, overloads, program-scope variables, ...):
    the compiler's message and the source lines it names."""


class OrderDependentWarning(UserWarning):
    """Outputs differ between schedules only by the rounding that the order
    of float atomic additions explains: not a race."""
