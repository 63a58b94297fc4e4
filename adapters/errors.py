"""One exception family, so callers can catch everything this package raises on purpose."""


class AdaptersError(Exception):
    """Base class: the message names the file/line/field at fault and how to fix it."""


class ConfigError(AdaptersError):
    """A recipe or override is wrong (unknown key, bad value). Lists every problem at once."""


class DataError(AdaptersError):
    """Training or eval data cannot be read or turned into examples."""


class ModelError(AdaptersError):
    """The base model cannot be loaded or does not fit the request (targets, quantization)."""


class AdapterFileError(AdaptersError):
    """An adapter folder is missing a file, is corrupted, or belongs to another base."""


class TrainingError(AdaptersError):
    """Training had to stop (non-finite losses, unwritable output, refused resume)."""


class OutputPathError(AdaptersError):
    """An output path that exists and is not ours to replace (a device, a FIFO, a file where a
    folder is expected, a folder of someone else's files)."""
