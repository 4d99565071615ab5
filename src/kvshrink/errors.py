"""Errors a user can cause. The CLI prints them as one line and exits with code 2."""


class KvshrinkError(ValueError):
    """Bad input: unknown model or method, unsupported architecture, bad option, bad corpus."""
