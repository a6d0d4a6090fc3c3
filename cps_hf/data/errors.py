"""The one error type of the data package.

Every bad-input problem (missing file, undecodable image, wrong label values, empty split,
protocol ids absent from the tree) raises `DatasetError` with a message that names the file or
field and what is wrong, so a user can fix the data instead of debugging the trainer.
"""

from ..errors import UserInputError


class DatasetError(UserInputError, ValueError):
    """Bad or missing input data; the message names the file/field and the problem."""
