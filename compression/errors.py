"""The one exception type for mistakes a user can make (bad source, ratio, method, file...)."""


class UserInputError(ValueError):
    """A bad input. The message names the input and what is allowed."""
