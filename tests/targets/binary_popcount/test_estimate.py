"""What a binary-popcount artifact says about its weights and cost matches what it ships.

An xnor-binarized LeNet (one training step: the figures depend only on shapes) has two
binary layers, the inner conv (16 -> 32 channels, 3x3, on 4x4 maps) and the first linear
(128 -> 64).  The manifest must call their weights 1-bit, and ``profile.json``'s estimate
must count their XNOR-popcount bit-ops and their bit-packed bytes, not float32 ones.
"""

from __future__ import annotations

import json
import math
import shutil

import numpy as np
import pytest
import torch

import sdk
from examples.models import LeNet
from sdk.cost import ARM_A76, PJ_PER_DRAM_BYTE, PJ_PER_MAC, PJ_PER_SRAM_BYTE
from targets.binary_popcount.blob import HEADER_BYTES
from targets.binary_popcount.runners import LAYERS_FILE

pytestmark = [pytest.mark.usefixtures("one_thread"),
              pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")]

RECIPE = {"stages": [{"method": "xnor", "config": {"epochs": 1, "max_steps": 1, "progress": False}}]}
BINARY_MODULES = {"features.4", "classifier.1"}
#: bit-ops of the two binary layers: O·H·W · C·k² and out · in
BINARY_BOPS = {"features.4": 32 * 4 * 4 * 16 * 9, "classifier.1": 64 * 128}


@pytest.fixture(scope="module")
def art(tmp_path_factory):
    torch.manual_seed(0)
    x8, y8 = torch.randn(8, 1, 8, 8), torch.randint(0, 10, (8,))
    return sdk.deploy(LeNet(), "binary-popcount", (x8[:1],), recipe=RECIPE, data=[(x8, y8)],
                      output=tmp_path_factory.mktemp("estimate") / "art", progress=False)


def test_the_manifest_says_binary_weights_are_stored_in_one_bit(art):
    rows = {r["layer"]: r for r in art.manifest["encodings"]}
    assert set(rows) == BINARY_MODULES
    for row in rows.values():
        assert (row["bits"], row["stored_bits"]) == (1, 1), row
        assert row["planned"] == "binary (1-bit signs, float32 scale per output channel)", row


def test_the_estimate_counts_the_binary_ops_the_lowering_runs(art):
    est, layers = art.profile["estimate"], art.profile["layers"]
    assert est["bops"] == sum(r["bops"] for r in layers) == sum(BINARY_BOPS.values())
    binary = {r["module"]: r for r in est["layers"] if r["format"] == "binary"}
    assert {m: r["bops"] for m, r in binary.items()} == BINARY_BOPS
    assert all(r["macs"] == 0 for r in binary.values())
    assert est["macs"] == sum(r["macs"] for r in layers)         # the float layers' MACs only


def test_the_estimate_sizes_weights_as_weights_bin_stores_them(art):
    blob = art.read_bytes("weights.bin")
    arrays = [a for layer in json.loads(art.read_bytes(LAYERS_FILE))["layers"] for a in layer["arrays"].values()]
    stored = sum(math.prod(a["shape"]) * np.dtype(a["dtype"]).itemsize for a in arrays)
    est = art.profile["estimate"]
    assert est["weight_bytes"] == stored
    # weights.bin is the header, the arrays, and under 64 bytes of alignment before each array
    assert 0 <= len(blob) - HEADER_BYTES - est["weight_bytes"] < 64 * len(arrays)
    conv = next(r for r in est["layers"] if r["module"] == "features.4" and r["format"] == "binary")
    assert conv["weight_bytes"] == 32 * 9 * 8 + 32 * 4      # one uint64 word per tap for 16 channels, α per output


def test_a_binary_layer_costs_its_bops_at_the_binary_rate_and_energy(art):
    conv = next(r for r in art.profile["estimate"]["layers"] if r["module"] == "features.4" and r["format"] == "binary")
    out_bytes = 32 * 4 * 4 * 4                                   # its float32 output
    energy_pj = conv["bops"] * PJ_PER_MAC["binary"] + conv["weight_bytes"] * PJ_PER_DRAM_BYTE \
        + out_bytes * PJ_PER_SRAM_BYTE
    seconds = max(conv["bops"] / ARM_A76.macs_per_s["binary"], (conv["weight_bytes"] + out_bytes) / ARM_A76.bytes_per_s)
    assert conv["est_energy_uj"] == pytest.approx(energy_pj * 1e-6, abs=1e-6)
    assert conv["est_latency_us"] == pytest.approx(seconds * 1e6 + ARM_A76.overhead_us, abs=1e-3)
