"""Errors that kt-bench reports to the user as one line, without a traceback."""


class KtBenchError(Exception):
    """A user-facing error: bad input, an unknown name, a broken plugin or config file."""


class UnknownNameError(KtBenchError):
    """A name that is not registered; the message lists the known names."""


class ConfigError(KtBenchError):
    """A configuration file or value that is malformed; the message names the file and key."""


class PluginError(KtBenchError):
    """A plugin that cannot be loaded or registers a duplicate name; the message names the file."""


class UnreadableFileError(KtBenchError):
    """A file that exists but that kt-bench may not read (permission denied). It is no sign of
    damage: the file is left where it is, and the message names it and says why."""


class UnwritableFileError(KtBenchError):
    """A file kt-bench could not write (disk full, an I/O error, no permission); the message
    names it and the system's reason. The file as it was before is left in place."""


def first_line(exc: BaseException) -> str:
    """``exc`` as one line: a kt-bench error's message as it is; any other exception's type
    and the first line of its message (the type alone when the message is empty)."""
    text = str(exc).strip()
    line = text.splitlines()[0] if text else ""
    if isinstance(exc, KtBenchError):
        return line or type(exc).__name__
    return f"{type(exc).__name__}: {line}" if line else type(exc).__name__
