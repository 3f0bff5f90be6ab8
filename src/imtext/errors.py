"""Errors a user can act on.

Every error raised for bad input or bad settings is an :class:`ImtextError`; its message names the
file, record or setting at fault and says what to do. The CLI prints it on one line and exits non-zero
(with a traceback only under ``--debug``); anything else escaping is a bug.
"""


class ImtextError(Exception):
    """Base class for errors caused by input, configuration or environment, not by a bug."""


class ConfigError(ImtextError):
    """A setting in params.yaml or on the command line is missing, unknown or invalid."""


class DataError(ImtextError):
    """An annotation file, image or caption cannot be used."""


def printable(text: str) -> str:
    """``text`` with every character a terminal would act on escaped as in ``repr``.

    File names, object keys and annotation fields come from the input: a newline in one would
    split a one-line error, an ANSI escape would recolour or rewrite the terminal, a bidi control
    would reorder what the reader sees. Printable characters, spaces included, pass unchanged, so
    escaping twice changes nothing more.
    """
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
