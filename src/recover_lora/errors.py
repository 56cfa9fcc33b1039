"""The one exception type a user acts on (kept apart so that the config and CLI import no torch)."""


class RecoverLoraError(RuntimeError):
    """An error the user can act on; the CLI prints its message without a traceback."""
