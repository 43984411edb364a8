"""verify holds every runner to the float model / the golden outputs, not only to the reference.

A consistently tampered arm-int8 artifact (weights changed, hashes rewritten) runs the same
integers in ``host`` and ``reference``, so the reference comparison alone passed it; the
target's ``min_sqnr_db`` against the float outputs catches it.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import sdk
from examples.models import make
from sdk.errors import InputError
from sdk.litert.fbcheck import check_model
from sdk.verify import FLOAT_MODEL, GOLDEN, REFERENCE, merge_rules
from tamper import rewrite


def _batches(shape, n, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(n)]


@pytest.fixture(scope="module")
def lenet(tmp_path_factory):
    model, x = make("lenet")
    art = sdk.deploy(model, target="arm-int8", example_inputs=(x,), calibration=_batches(x.shape, 8, 0),
                     output=tmp_path_factory.mktemp("fid") / "lenet", progress=False)
    return model, x, art


def _tamper(art, dest: Path) -> Path:
    """A copy of ``art`` whose largest weight buffer is negated, with manifest hashes rewritten:
    load() accepts it, fbcheck accepts it, host and reference agree on it."""
    shutil.copytree(art.path, dest)
    path = dest / "model.tflite"
    data = bytearray(path.read_bytes())
    start, end = max(check_model(bytes(data)).buffer_spans, key=lambda s: s[1] - s[0])
    w = np.frombuffer(bytes(data[start:end]), np.int8)
    data[start:end] = np.clip(-w.astype(np.int16), -127, 127).astype(np.int8).tobytes()
    rewrite(dest, "model.tflite", bytes(data))
    return dest


def test_arm_int8_states_a_fidelity_bound(lenet):
    _, _, art = lenet
    assert art.manifest["verify"]["min_sqnr_db"] == 20.0


def test_untampered_artifact_passes_against_float_model_golden_and_reference(lenet):
    model, x, art = lenet
    for rep in (art.verify(), art.verify(inputs=_batches(x.shape, 3, 1)),
                art.verify(model, inputs=_batches(x.shape, 3, 1))):
        assert rep.passed, str(rep)
        assert rep.golden_sqnr_db["host"] > 30 and rep.golden_sqnr_db["reference"] > 30, str(rep)
    rep = art.verify(model, inputs=_batches(x.shape, 3, 1))
    assert rep.compared_with["host"] == [FLOAT_MODEL, GOLDEN, REFERENCE]
    assert rep.compared_with["reference"] == [FLOAT_MODEL, GOLDEN]
    assert rep.sqnr_db["host"] > 30
    assert art.verify(inputs=_batches(x.shape, 2, 1)).compared_with["host"] == [GOLDEN, REFERENCE]
    assert "compared with" in str(rep)


def test_tampered_artifact_fails_on_sqnr_although_host_and_reference_agree(lenet, tmp_path):
    model, x, art = lenet
    bad = sdk.load(_tamper(art, tmp_path / "tampered"))
    for rep in (bad.verify(), bad.verify(inputs=_batches(x.shape, 3, 1)),
                bad.verify(model, inputs=_batches(x.shape, 3, 1))):
        assert not rep.passed, str(rep)
        assert rep.bit_exact_ratio["host"] >= 0.99 and rep.max_lsb["host"] <= 1, str(rep)   # they agree
        assert any("SQNR" in f and "host" in f for f in rep.failures), rep.failures
        assert any("SQNR" in f and "reference" in f for f in rep.failures), rep.failures
        assert rep.golden_sqnr_db["host"] < 20
    rep = bad.verify(model, inputs=_batches(x.shape, 3, 1))
    assert any("vs the float model" in f for f in rep.failures)
    assert any("vs the golden outputs" in f for f in rep.failures)
    with pytest.raises(sdk.VerificationError, match="SQNR"):
        bad.verify(strict=True)


def test_an_edited_manifest_cannot_loosen_the_rules(lenet, tmp_path):
    _, _, art = lenet
    dest = _tamper(art, tmp_path / "loose")
    manifest = json.loads((dest / "manifest.json").read_text())
    manifest["verify"] = {}
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    rep = sdk.load(dest).verify()
    assert not rep.passed and rep.rules["min_sqnr_db"] == 20.0, str(rep)


def test_merge_rules_keeps_the_stricter_bound():
    stored = {"min_sqnr_db": 30, "max_rel_err": 1e-2, "runners": {"fp16": {"max_rel_err": 0.5}}}
    stated = {"min_sqnr_db": 20, "max_rel_err": 1e-3, "max_lsb": 1, "runners": {"fp16": {"max_rel_err": 1e-2}}}
    assert merge_rules(stored, stated) == {"min_sqnr_db": 30, "max_rel_err": 1e-3, "max_lsb": 1,
                                           "runners": {"fp16": {"max_rel_err": 1e-2}}}


def test_verify_needs_an_input(lenet):
    model, _, art = lenet
    with pytest.raises(InputError, match="at least one input"):
        art.verify(inputs=[])
    with pytest.raises(InputError, match="at least one input"):
        art.verify(model, inputs=[])


def test_profile_records_fidelity_to_the_float_model(lenet):
    from sdk.verify import sqnr_db

    model, x, art = lenet
    fid = art.profile["fidelity"]
    gin, gout = art.golden()
    want = sqnr_db(gout[0], art.run(*gin)[0])       # independent: recomputed from the stored golden outputs
    assert fid["runner"] == "host" and abs(fid["sqnr_db"] - want) < 0.01 and fid["sqnr_db"] > 30
    assert fid["max_abs_err"] == pytest.approx(float(np.abs(gout[0] - art.run(*gin)[0]).max()), rel=1e-6)
