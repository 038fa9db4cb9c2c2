"""One exception type for every bad input the merging tools can meet."""


class MergeError(ValueError):
    """Bad experts, options or artifact: the message names the file or field and what was expected."""
