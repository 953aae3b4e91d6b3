"""The one exception type edgepack raises for anything a user can fix."""


class EdgepackError(Exception):
    """A failure a user can act on: the message says what, where, and what to do."""
