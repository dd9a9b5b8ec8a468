"""Errors a person can act on: the message says what is wrong and what to do."""


class UserError(Exception):
    """Raised for problems the user fixes (bad input, missing tool, port taken).

    The `tandem` command prints the message without a traceback and exits 1.
    """
