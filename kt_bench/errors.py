"""Errors that kt-bench reports to the user as one line, without a traceback."""


class KtBenchError(Exception):
    """A user-facing error: bad input, an unknown name, a broken plugin or config file."""


class UnknownNameError(KtBenchError):
    """A name that is not registered; the message lists the known names."""


class ConfigError(KtBenchError):
    """A configuration file or value that is malformed; the message names the file and key."""


class PluginError(KtBenchError):
    """A plugin that cannot be loaded or registers a duplicate name; the message names the file."""


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message, or its type's name when the message is empty."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
