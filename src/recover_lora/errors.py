"""The one exception type a user acts on (kept apart so that the config and CLI import no torch)."""


class RecoverLoraError(RuntimeError):
    """An error the user can act on; the CLI prints its message without a traceback."""


class Interrupted(RecoverLoraError):
    """Stopped by Ctrl-C or SIGTERM where the work can resume (a checkpoint, finished shards): a caller
    that goes on to other work after an error (the study) must stop instead."""
