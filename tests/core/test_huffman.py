"""sdk.huffman: canonical Huffman codes decode with an independent (RFC 1951 style, bit-string)
decoder, are optimal (the merge-cost formula) and within one bit of the entropy, keep to the
length limit; the relative sparse index follows the paper's filler-zero rule (a loop written
from the rule); the weight container round-trips, rebuilds a model from its skeleton, and any
damage is an ArtifactError."""

import hashlib
import math

import numpy as np
import pytest

from sdk import huffman as H
from sdk.errors import ArtifactError


# -- independent references ---------------------------------------------------------------

def rfc1951_codes(lengths):
    """Canonical codes as RFC 1951 §3.2.2 builds them (bl_count, next_code), as bit strings."""
    lengths = [int(n) for n in lengths]
    top = max(lengths, default=0)
    bl_count = [0] * (top + 1)
    for n in lengths:
        if n:
            bl_count[n] += 1
    next_code, code = [0] * (top + 2), 0
    for bits in range(1, top + 1):
        code = (code + bl_count[bits - 1]) << 1       # bl_count[0] is 0
        next_code[bits] = code
    codes = {}
    for sym, n in enumerate(lengths):
        if n:
            codes[sym] = format(next_code[n], f"0{n}b")
            next_code[n] += 1
    return codes


def bit_decoder(data: bytes, lengths, count):
    """Decode bit by bit, matching prefixes against the RFC 1951 codes."""
    table = {c: s for s, c in rfc1951_codes(lengths).items()}
    bits = "".join(format(b, "08b") for b in data)
    out, cur = [], ""
    for bit in bits:
        cur += bit
        if cur in table:
            out.append(table[cur])
            cur = ""
            if len(out) == count:
                break
    return out


def optimal_cost(counts):
    """Total bits of an optimal prefix code: the sum of the weights of every merge (textbook)."""
    w = sorted(c for c in counts if c > 0)
    if len(w) == 1:
        return w[0]
    cost = 0
    while len(w) > 1:
        a, b = w.pop(0), w.pop(0)
        cost += a + b
        w.append(a + b)
        w.sort()
    return cost


def entropy_bits(counts):
    c = np.asarray([x for x in counts if x > 0], np.float64)
    p = c / c.sum()
    return float(-(p * np.log2(p)).sum())


def distributions():
    rng = np.random.default_rng(0)
    yield "uniform", np.full(13, 50)
    yield "geometric", (1000 * 0.5 ** np.arange(12)).astype(int) + 1
    yield "zipf", (5000 / np.arange(1, 65)).astype(int)
    yield "with unused symbols", np.where(rng.random(40) < 0.3, 0, rng.integers(1, 200, 40))
    yield "two symbols", np.array([999, 1])
    yield "random", rng.integers(1, 10_000, 256)


# -- Huffman codes --------------------------------------------------------------------------

@pytest.mark.parametrize("name,counts", list(distributions()), ids=[d[0] for d in distributions()])
def test_canonical_code_decodes_with_an_independent_decoder(name, counts):
    lengths = H.code_lengths(counts)
    assert (lengths[counts == 0] == 0).all() and (lengths[counts > 0] > 0).all()
    codes = rfc1951_codes(lengths)
    ours = H.canonical_codes(lengths)
    for sym, code in codes.items():                   # the same canonical assignment
        assert format(int(ours[sym]), f"0{lengths[sym]}b") == code
    words = list(codes.values())                        # prefix-free
    assert not any(a != b and b.startswith(a) for a in words for b in words)
    rng = np.random.default_rng(1)
    p = counts / counts.sum()
    symbols = rng.choice(len(counts), size=3000, p=p)
    data = H.encode(symbols, lengths)
    assert len(data) == math.ceil(sum(int(lengths[s]) for s in symbols) / 8)
    assert bit_decoder(data, lengths, len(symbols)) == symbols.tolist()
    assert H.decode(data, lengths, len(symbols)).tolist() == symbols.tolist()


@pytest.mark.parametrize("name,counts", list(distributions()), ids=[d[0] for d in distributions()])
def test_code_is_optimal_and_within_one_bit_of_the_entropy(name, counts):
    lengths = H.code_lengths(counts)
    total = int((counts * lengths).sum())
    assert total == optimal_cost(counts)
    mean, h = total / counts.sum(), entropy_bits(counts)
    assert h - 1e-12 <= mean < h + 1, (mean, h)
    # the container's size accounting is the same sum
    assert H.coded_bits(counts, lengths) == total


def test_lengths_are_limited_to_16_bits_and_still_decode():
    fib = [1, 1]
    while len(fib) < 30:
        fib.append(fib[-1] + fib[-2])
    counts = np.array(fib)              # an optimal code would be 29 bits deep
    lengths = H.code_lengths(counts)
    assert lengths.max() <= H.MAX_CODE_BITS == 16
    assert sum(2.0 ** -int(n) for n in lengths) <= 1.0
    symbols = np.arange(30).repeat(3)
    data = H.encode(symbols, lengths)
    assert bit_decoder(data, lengths, len(symbols)) == symbols.tolist() == H.decode(data, lengths, 90).tolist()


def test_one_symbol_and_no_symbols():
    lengths = H.code_lengths([0, 7, 0])
    assert lengths.tolist() == [0, 1, 0]
    data = H.encode(np.ones(7, int), lengths)
    assert data == b"\x00" and H.decode(data, lengths, 7).tolist() == [1] * 7
    assert H.code_lengths([0, 0]).tolist() == [0, 0]
    assert H.encode(np.zeros(0, int), [0, 0]) == b"" and H.decode(b"", [0, 0], 0).size == 0


@pytest.mark.parametrize("data,lengths,count,match", [
    (b"\xff", [1, 2, 2], 5, "need 9 bits"),                  # ends early: four 2-bit codes, then none
    (b"\x00", [1, 1], 9, "more than the 8 bits"),            # fewer bits than symbols
    (b"\x00\x00", [1, 1], 8, "follows the last symbol"),     # a whole byte too many
    (b"\x01", [1, 1], 7, "follows the last symbol"),         # nonzero padding
    (b"\xc0", [1, 2, 0], 1, "no code"),                      # '11' is no code of {0, 10}
    (b"\x00", [1, 1, 1], 1, "over-subscribed"),
    (b"\x00", [17, 1], 1, "outside"),
    (b"\x00", [0, 0], 1, "no codes"),
    (b"\x00", [1, 1], 0, "holds data"),
])
def test_damaged_streams_are_artifact_errors(data, lengths, count, match):
    with pytest.raises(ArtifactError, match=match):
        H.decode(data, lengths, count)


# -- relative sparse indices ----------------------------------------------------------------

def entries_by_the_rule(flat, diff_bits):
    """The paper's rule, one element at a time: count zeros; when the count would exceed the
    largest gap, store a filler zero (gap = largest) and start counting again.  The zeros after
    the last nonzero are not stored (the shape implies them)."""
    largest = 2 ** diff_bits - 1
    codebook = sorted({int(v) for v in flat if v != 0})
    nonzero = [i for i, v in enumerate(flat) if v != 0]
    gaps, syms, run = [], [], 0
    for v in flat[:nonzero[-1] + 1 if nonzero else 0]:
        if v == 0:
            if run == largest:
                gaps.append(largest)
                syms.append(0)
                run = 0
            else:
                run += 1
        else:
            gaps.append(run)
            syms.append(codebook.index(int(v)) + 1)
            run = 0
    return codebook, gaps, syms


def test_relative_indices_follow_the_filler_zero_rule():
    # 3-bit gaps: runs of 1, 2, 7 (fits), 8 (a filler, then 0) and 10 zeros (a filler, then 2)
    flat = np.zeros(40, np.int8)
    pos = [1, 4, 12, 21, 32]
    flat[pos] = [3, -1, 3, 5, -1]
    codebook, gaps, syms = H.relative_entries(flat, 3)
    assert codebook.tolist() == [-1, 3, 5]
    assert gaps.tolist() == [1, 2, 7, 7, 0, 7, 2]
    assert syms.tolist() == [2, 1, 2, 0, 3, 0, 1]
    assert H.from_entries(codebook, gaps, syms, flat.size).tolist() == flat.tolist()
    rng = np.random.default_rng(3)
    for density in (0.02, 0.1, 0.5):
        w = np.where(rng.random(3000) < density, rng.integers(-127, 128, 3000), 0).astype(np.int8)
        for b in range(1, 9):
            codebook, gaps, syms = H.relative_entries(w, b)
            ref = entries_by_the_rule(w, b)
            assert (codebook.tolist(), gaps.tolist(), syms.tolist()) == ref
            assert np.array_equal(H.from_entries(codebook, gaps, syms, w.size), w)


def test_fixed_width_accounting():
    w = np.zeros(100, np.int8)
    w[[0, 50]] = [4, 9]                 # 5-bit gaps: 0, then 49 = 32 + 17 (one filler)
    assert H.fixed_width_bytes(w, 5, 32) == math.ceil(3 * 37 / 8)
    assert H.fixed_width_bytes(w, 5, 2, codebook_bits=32) == math.ceil((3 * 7 + 2 * 32) / 8)


# -- the container ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model_and_tensors():
    rng = np.random.default_rng(7)
    shapes = {"a/weight": (30, 40), "b/weight": (10, 3, 3, 4), "c/weight": (25,)}
    model = bytearray(rng.integers(0, 256, 4000, dtype=np.uint8).tobytes())
    tensors, offset = {}, 100
    for name, shape in shapes.items():
        values = rng.integers(-127, 128, shape)
        keep = rng.random(shape) < 0.15
        centroids = np.array([-90, -40, 12, 60, 127])
        w = np.where(keep, centroids[np.abs(values) % 5], 0).astype(np.int8)
        model[offset:offset + w.size] = w.tobytes()
        tensors[name] = (w, offset)
        offset += w.size + 111
    return bytes(model), tensors


def make_container(model, tensors, **kw):
    coded = [H.encode_tensor(w, name, off, scales=[0.01] * w.shape[0], **kw) for name, (w, off) in tensors.items()]
    return H.write_container(coded, model), coded


def test_container_round_trips_and_rebuilds_the_model_from_its_skeleton(model_and_tensors):
    model, tensors = model_and_tensors
    blob, coded = make_container(model, tensors)
    got = H.expand(blob)
    assert set(got) == set(tensors)
    for name, (w, _) in tensors.items():
        assert got[name].dtype == np.int8 and np.array_equal(got[name], w)
    size, digest, read = H.read_container(blob)
    assert size == len(model) and digest == hashlib.sha256(model).digest()
    assert [t.scales.tolist() for t in read] == [[pytest.approx(0.01)]] * 3        # one scale shared
    np.testing.assert_allclose(read[0].centroids(), np.float32(0.01) * read[0].codebook[None].astype(np.float32))
    skel = H.skeleton(model, blob)
    assert len(skel) == len(model) - sum(w.size for w, _ in tensors.values())
    assert H.expand_model(skel, blob) == model == H.expand_model(model, blob)
    # the chosen gap width is the smallest container among all widths
    for b in range(1, 9):
        assert len(make_container(model, tensors, diff_bits=b)[0]) >= len(blob)


def test_a_container_for_other_weights_or_another_model_is_refused(model_and_tensors):
    model, tensors = model_and_tensors
    blob, _ = make_container(model, tensors)
    other = dict(tensors)
    w, off = other["a/weight"]
    w = w.copy()
    w[0, 0] = 7 if w[0, 0] != 7 else 8
    other["a/weight"] = (w, off)
    wrong = H.write_container([H.encode_tensor(v, n, o) for n, (v, o) in other.items()], model)
    with pytest.raises(ArtifactError, match="other weights"):
        H.expand_model(model, wrong)
    with pytest.raises(ArtifactError, match="sha256 differs"):
        H.expand_model(model[:-1] + bytes([model[-1] ^ 1]), blob)
    with pytest.raises(ArtifactError, match="neither"):
        H.expand_model(model + b"\0", blob)


def test_any_damage_to_the_container_is_an_artifact_error(model_and_tensors):
    """Bit flips, truncations and insertions anywhere: the decoder raises ArtifactError or (a flip
    in a field the expansion does not read, a scale) still rebuilds exactly the model."""
    model, tensors = model_and_tensors
    blob, _ = make_container(model, tensors)
    rng = np.random.default_rng(11)
    outcomes = {"refused": 0, "harmless": 0}
    for i in range(400):
        data = bytearray(blob)
        kind = i % 4
        at = int(rng.integers(0, len(data)))
        if kind in (0, 1):
            data[at] ^= 1 << int(rng.integers(0, 8))
        elif kind == 2:
            del data[at:]
        else:
            data[at:at] = bytes([int(rng.integers(0, 256))])
        try:
            assert H.expand_model(model, bytes(data)) == model
            outcomes["harmless"] += 1
        except ArtifactError:
            outcomes["refused"] += 1
    assert outcomes["refused"] > 350, outcomes
    for bad, match in [(b"", "magic"), (b"XXXX" + blob[4:], "not an edgepack weight container"),
                       (blob[:4] + b"\x02\x00" + blob[6:], "format version 2"), (blob + b"\0", "follow")]:
        with pytest.raises(ArtifactError, match=match):
            H.expand(bad)
