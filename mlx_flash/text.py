"""``first_line``: the one-line form of a message, for one-line errors."""


def first_line(message) -> str:
    """The first non-empty line of ``message`` (a string, or an exception's
    message), stripped; an exception without a message gives its type's
    name, an empty string ``""``."""
    for line in str(message).splitlines():
        if line.strip():
            return line.strip()
    return type(message).__name__ if isinstance(message, BaseException) else ""
