"""Test-only plugin: registers a second pruner named 'magnitude'."""

from sdk import hookimpl
from plugins.prune.magnitude import MagnitudePruner


class OtherMagnitude(MagnitudePruner):
    name = "magnitude"


@hookimpl
def register_pruners(register):
    register(OtherMagnitude)
