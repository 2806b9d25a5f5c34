"""User-facing errors: each carries one line that says what is wrong and what to do.

The CLI prints the message and exits non-zero; nothing else is shown to the user.
"""


class MusicsteerError(Exception):
    exit_code = 2


class ModelLoadError(MusicsteerError):
    pass


class UsageError(MusicsteerError):
    pass
