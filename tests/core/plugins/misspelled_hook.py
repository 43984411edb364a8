"""Test-only plugin: a hookimpl whose name matches no hook spec."""

from sdk import hookimpl


@hookimpl
def register_prunerz(register):
    pass
