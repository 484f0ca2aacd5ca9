"""Placeholder: this module's commands are being written."""


def register(sub) -> None:
    return None
