"""The one exception type a user should ever see: a single line that says what is wrong and what to do."""


class DeepRedError(Exception):
    """A problem the user can fix. The CLI prints its message on one line and exits non-zero."""

    exit_code = 2


class InvalidDatasetError(DeepRedError):
    """The dataset has problems; `problems` holds every `FILE:LINE: message`."""

    exit_code = 1

    def __init__(self, message: str, problems: list[str]):
        super().__init__(message)
        self.problems = problems


class DatasetNotFoundError(DeepRedError):
    """The dataset the user named (by --dataset or $GUTENBERG_DATA) is not there; nothing else is used instead."""

    exit_code = 1
