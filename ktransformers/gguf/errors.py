"""The one error type the GGUF reader raises: always names the file and the reason."""

from pathlib import Path


class GGUFError(ValueError):
    """A GGUF file (or split set) cannot be used; the message says which file and why."""

    def __init__(self, path: Path | str, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path}: {reason}")
