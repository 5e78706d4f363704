"""The one error type a user sees: a clear one-line message and a non-zero exit."""


class UserError(Exception):
    """Bad input or configuration. The entry point prints ``error: <message>`` and exits 2."""

    exit_code = 2

    def __init__(self, message: str) -> None:
        # Keep it on one line: the message is what the user reads.
        super().__init__(" ".join(str(message).split()))
