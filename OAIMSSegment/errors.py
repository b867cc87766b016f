"""Errors the engine raises for bad input: one specific, user-facing message each.

The CLI turns them into exit code 2 and one line; the Slicer module shows the message.
"""


class OAIMSError(Exception):
    """Base class: something the user can fix (bad input, missing file, wrong model)."""


class InvalidImageError(OAIMSError, ValueError):
    """The image cannot be segmented as given (NaN/inf, constant, wrong shape or channels, too small/large)."""


class InvalidClickError(OAIMSError, ValueError):
    """A click is outside the image, has non-finite coordinates or an unknown label."""


class DatasetError(OAIMSError):
    """A dataset folder or its ``dataset.json`` is missing or malformed."""


class ModelError(OAIMSError):
    """Unknown model name, unreadable or mismatched weights, or a bad model card."""


class StoreError(OAIMSError):
    """The site model store cannot be read or written (permissions, disk full, corrupt files)."""


class SessionStateError(OAIMSError, RuntimeError):
    """An operation that does not fit the session's state (e.g. accept with no clicks)."""


class InvalidMaskError(OAIMSError, ValueError):
    """An accepted mask is not a class map of the open image (NaN, fractional or unknown labels, wrong shape)."""


class DeviceError(OAIMSError, ValueError):
    """A compute device that is unknown or that the installed PyTorch cannot use."""
