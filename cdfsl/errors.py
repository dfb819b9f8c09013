"""The one error type users see: a single line naming the input, what was expected and the fix."""


class CdfslError(Exception):
    """A user-facing error. The CLI prints ``str(err)`` as one line and exits non-zero."""


class DataError(CdfslError):
    """A dataset folder, file or episode request that cannot be served."""


class WeightsError(CdfslError):
    """Pretrained weights that are not available locally."""
