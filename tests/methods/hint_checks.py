"""The encoding-hint check the method tests share (imported as ``hint_checks``: pytest puts this
directory on ``sys.path``)."""

from sdk.encoding import hints_of
from sdk.graph import WEIGHTED_OPS, capture


def check_hints(model, example, expected):
    """``expected`` is ``{layer name: Hint}``: each layer's hint after :func:`sdk.compress` (or a
    method's ``apply``), and the hint the captured graph holds under that layer's weight constant
    (and no others)."""
    for name, hint in expected.items():
        assert hints_of(model.get_submodule(name)) == hint, name
    graph = capture(model, (example,))
    weight_of = {n.module: n.inputs[1] for n in graph.nodes if n.op in WEIGHTED_OPS}
    assert graph.hints == {weight_of[name]: hint for name, hint in expected.items()}
