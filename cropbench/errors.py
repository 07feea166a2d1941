"""Errors a user can act on: each names the file, field or name that is wrong and what was expected."""


class CropbenchError(Exception):
    """Base class; the CLI prints these without a traceback and exits 2."""


def plural(kind: str) -> str:
    """English plural of a kind's head noun: entry -> entries, "variant of x" -> "variants of x"."""
    head, sep, tail = kind.partition(" of ")
    if head.endswith("y") and head[-2:-1] not in tuple("aeiou"):
        head = head[:-1] + "ie"
    return f"{head}s{sep}{tail}"


class UnknownNameError(CropbenchError, KeyError):
    def __init__(self, kind: str, name: str, valid: list[str]):
        self.kind, self.name, self.valid = kind, name, valid
        listed = ", ".join(sorted(valid)) or "(none)"
        super().__init__(f"unknown {kind} {name!r}; valid {plural(kind)}: {listed}")

    def __str__(self) -> str:  # KeyError would otherwise repr() the message
        return self.args[0]


class ConfigError(CropbenchError):
    """A recipe or entry file that does not validate: names file, key path and expectation."""


class DatasetError(CropbenchError):
    """A dataset that is missing or not in the expected layout: names the path, shows the layout."""


class TrainingError(CropbenchError):
    """Training cannot continue (e.g. a non-finite loss); the last good checkpoint is kept."""


class CheckpointError(TrainingError):
    """A checkpoint that cannot be read safely (corrupt, truncated, or holding objects that would
    run code when unpickled): names the file and what to do."""
