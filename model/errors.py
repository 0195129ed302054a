"""The one base of every error tinymod reports as a clean failure: a message and exit 1, not a traceback.

Light on purpose (it imports nothing), so that a stage's ``main()`` can catch every such error
without importing torch and transformers before its work starts.
"""


class TinymodError(Exception):
    """A failure whose message says what went wrong and what to do."""


class CheckpointError(TinymodError, ValueError):
    """A checkpoint that tinymod refuses to load, with what is wrong and what to do."""
