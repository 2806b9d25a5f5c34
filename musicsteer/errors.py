"""User-facing errors: each carries one line that says what is wrong and what to do.

The CLI prints the message and exits non-zero; nothing else is shown to the user.
"""


class MusicsteerError(Exception):
    exit_code = 2


class ModelLoadError(MusicsteerError):
    pass


class UsageError(MusicsteerError):
    pass


class MissingPackageError(UsageError):
    """A command needs a Python package that is not installed; the message names it."""

    def __init__(self, command: str, packages: list[str]) -> None:
        self.packages = packages
        what = "a package that is" if len(packages) == 1 else "packages that are"
        super().__init__(f"{command} needs {what} not installed: {', '.join(packages)} "
                         f"(pip install {' '.join(packages)})")
