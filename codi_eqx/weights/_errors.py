from ..errors import CodiError


class WeightsError(CodiError, ValueError):
    """A weight file or directory that cannot be read as asked; the message names the problem."""
