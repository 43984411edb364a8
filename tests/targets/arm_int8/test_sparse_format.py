"""sdk/litert/sparse.py against TFLite's own sparse format converter (shipped in ai-edge-litert as
format_converter_wrapper_pybind11): the same values and CSR arrays for every split, and the
densified tensor equal to the original."""

import numpy as np
import pytest

from sdk.errors import ArtifactError
from sdk.litert.sparse import densify, encode, stored_bytes

fc = pytest.importorskip("ai_edge_litert.format_converter_wrapper_pybind11")
DENSE, CSR = fc.TfLiteDimensionType.TF_LITE_DIM_DENSE, fc.TfLiteDimensionType.TF_LITE_DIM_SPARSE_CSR


def _tflite(w: np.ndarray, sparse_from: int, block: int):
    n = w.ndim
    dims = [DENSE] * sparse_from + [CSR] * (n - sparse_from) + ([DENSE] if block > 1 else [])
    conv = fc.FormatConverterFp32(list(w.shape), list(range(n + (block > 1))), dims,
                                  [block] if block > 1 else [], [n - 1] if block > 1 else [])
    conv.DenseToSparse(w.reshape(-1))
    return np.array(conv.GetData(), np.float32), [list(m) for m in conv.GetDimMetadata()]


def _mine(sp) -> list[list[int]]:
    out = []
    for m in sp.dimMetadata:
        if m.format == 1:
            out += [m.arraySegments.values.tolist(), m.arrayIndices.values.tolist()]
        else:
            out += [[m.denseSize], []]
    return out


@pytest.mark.parametrize("shape, block", [((8, 3, 3, 1), 1), ((6, 1, 1, 16), 1), ((5, 12), 1), ((4, 3, 3, 8), 1),
                                          ((16, 32), 4), ((8, 64), 16), ((3, 300), 1)])
def test_encode_matches_tflite_format_converter(shape, block):
    rng = np.random.default_rng(sum(shape))
    w = rng.standard_normal(shape).astype(np.float32)
    w[rng.random(shape) < 0.8] = 0
    splits = range(len(shape)) if block == 1 else [len(shape) - 1]     # TFLite blocks the last CSR dim only
    for k in splits:
        values, sp = encode(w, block, k)
        ref_values, ref_meta = _tflite(w, k, block)
        np.testing.assert_array_equal(values, ref_values)
        assert _mine(sp) == ref_meta
        np.testing.assert_array_equal(densify(values, sp, shape), w)
    if block == 1:          # the default split is the smallest of those after the first dimension
        assert stored_bytes(*encode(w)) == min(stored_bytes(*encode(w, 1, k)) for k in range(1, len(shape)))


def test_indices_take_the_narrowest_type():
    w = np.zeros((2, 70000), np.float32)
    w[0, 5], w[1, 69999] = 1, 2
    _, sp = encode(w, 1, 1)
    assert sp.dimMetadata[1].arrayIndices.values.dtype == np.int32      # 69999 > 65535
    w = np.zeros((2, 300), np.float32)
    w[1, 299] = 1
    _, sp = encode(w, 1, 1)
    assert sp.dimMetadata[1].arrayIndices.values.dtype == np.uint16 and sp.dimMetadata[1].arraySegments.values.dtype \
        == np.uint8


def test_inconsistent_arrays_are_refused():
    w = np.array([[0, 2, 0, 0], [0, 0, 0, 5]], np.float32)
    values, sp = encode(w, 1, 1)
    sp.dimMetadata[1].arrayIndices.values = np.array([1, 9], np.uint8)         # index outside the row
    with pytest.raises(ArtifactError, match="inconsistent"):
        densify(values, sp, w.shape)
    values, sp = encode(w, 1, 1)
    with pytest.raises(ArtifactError, match="addresses"):
        densify(values[:1], sp, w.shape)
    sp.traversalOrder = [0, 0]
    with pytest.raises(ArtifactError, match="permutation"):
        densify(values, sp, w.shape)
