"""Hostile and odd input on issue 19's new surfaces, found by a second reader: a tiny weights.zr
that claims gigabytes, Huffman streams that overrun, early-exit stage MACs that overflow, a
data-free quantizer on a cascade, and the search quantizers' config validation.  Each states what
DESIGN.md asks for (bad input: a named error, never a raw one; nothing half-written)."""

import json
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import sdk
from sdk.errors import ArtifactError
from tests.helpers.tamper import rehash

ROOT = Path(__file__).resolve().parents[2]


# -- zero-run container: a tiny container that claims gigabytes --------------------------------------

def test_zero_run_huge_claimed_tensors_are_an_artifact_error_not_memory_error():
    """A 192-byte weights.zr (4 all-zero tensors of 2^31 elements, empty streams: valid for the
    format, trailing zeros cost nothing) expanded as a skeleton: the decoder allocates each tensor,
    copies it (tobytes) and keeps every part for the join before the sha256 check.  Under a 1.5 GiB
    address-space limit that is a MemoryError; unbounded it asks for ~16+ GiB."""
    code = textwrap.dedent("""
        import hashlib, resource, struct
        from sdk import zero_run as Z
        from sdk.weight_container import tensor_head
        n, k = 1 << 31, 4
        recs = b"".join(tensor_head(f"t{i}", 100 + i * n, (n,)) + struct.pack("<BBBII", 1, 1, 1, 0, 0)
                        + struct.pack("<II", 0, 0) for i in range(k))
        blob = Z.MAGIC + struct.pack("<HHQ", 1, k, 100 + k * n) + hashlib.sha256(b"?").digest() + recs
        resource.setrlimit(resource.RLIMIT_AS, (1536 << 20, 1536 << 20))
        try:
            Z.expand_model(b"x" * 100, blob)
        except Exception as e:
            print(type(e).__name__)
        """)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert out.stdout.strip() == "ArtifactError", (out.stdout, out.stderr[-2000:])


# -- early-exit artifacts ---------------------------------------------------------------------------

def _cascade():
    from sdk.early_exit import CascadeStage, EarlyExitCascade, ExitHead, ExitPolicy

    torch.manual_seed(0)
    b0 = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
    b1 = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())
    b2 = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 10))
    stages = [CascadeStage(b0, ExitHead((4, 8, 8), 10), ExitPolicy()),
              CascadeStage(b1, ExitHead((4, 8, 8), 10), ExitPolicy()), CascadeStage(b2)]
    return EarlyExitCascade(stages, [0.5, 0.5], [1, 1, 1], 3).eval()


@pytest.fixture(scope="module")
def cascade_art(tmp_path_factory):
    x = torch.randn(2, 1, 8, 8)
    return sdk.deploy(_cascade(), target="arm-fp32", example_inputs=(x,),
                      output=tmp_path_factory.mktemp("ee") / "art", progress=False), x


def test_huge_stage_macs_are_refused_at_load(cascade_art, tmp_path):
    """A stage claiming 2^63 MACs (the profile rows rewritten to match) is refused at load: its
    running sums would overflow int64 (OverflowError, or a silent wrap for 2^62 + 2^62)."""
    art, x = cascade_art
    where = tmp_path / "a"
    shutil.copytree(art.path, where)
    prof = json.loads((where / "profile.json").read_text())
    for row in prof["layers"]:
        row["macs"] = 0
    first = next(r for r in prof["layers"] if r["stage"] == 0)
    first["macs"] = float(2 ** 63)
    (where / "profile.json").write_text(json.dumps(prof))
    rehash(where, "profile.json")
    m = json.loads((where / "manifest.json").read_text())
    for k, st in enumerate(m["early_exit"]["stages"]):
        st["macs"] = 2 ** 63 if k == 0 else 0
    (where / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ArtifactError, match="macs"):
        sdk.load(where)


def test_failed_cascade_deploy_writes_nothing(tmp_path):
    """Stage 2 fails to lower (an op the target refuses): the output must not exist afterwards."""
    from sdk.early_exit import CascadeStage

    class Bad(nn.Module):
        def forward(self, x):
            return torch.fft.fft(x.flatten(1)).real[:, :10]

    c = _cascade()
    c.stages[2] = CascadeStage(Bad())
    out = tmp_path / "out"
    with pytest.raises(Exception):
        sdk.deploy(c, target="arm-fp32", example_inputs=(torch.randn(1, 1, 8, 8),), output=out, progress=False)
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == []


def test_data_free_quantizer_deploys_a_cascade(tmp_path):
    """deploy's single-graph path asks a data-free quantizer for its calibration_data; the cascade
    path (pack_cascade) never does, so data-free + early-exit fails with 'calibration data is
    required' although data-free needs none."""
    x = torch.randn(2, 1, 8, 8)
    recipe = {"stages": [{"method": "data-free", "config": {"progress": False, "steps": 2, "num_samples": 2}}]}
    art = sdk.deploy(_cascade(), "arm-int8", example_inputs=(x,), recipe=recipe, output=tmp_path / "a",
                     progress=False)
    assert art.manifest["quantization"]["method"] == "data-free"


@pytest.mark.parametrize("kw", [{"hidden": 1.5}, {"batch_size": 2.5}, {"buffer_size": 10.5}, {"updates": 1.5},
                                {"warmup_episodes": 1.5}, {"actor_lr": float("inf")}, {"seed": "x"}])
def test_autoqb_agent_config_rejects_non_integers(kw):
    from plugins.quantize.autoqb import AgentConfig
    from sdk.errors import ConfigError

    with pytest.raises(ConfigError):
        AgentConfig(**kw)


@pytest.mark.parametrize("kw", [{"progress": "no"}, {"final_epochs": 0.5}, {"lr": float("inf")}, {"seed": 1.5}])
def test_bo_mixed_precision_config_gaps(kw):
    from plugins.quantize.bo_mixed_precision import BOMixedPrecision
    from sdk.errors import ConfigError

    with pytest.raises(ConfigError):
        BOMixedPrecision.Config(max_bops=10, **kw)


def test_huffman_stream_that_overruns_is_an_artifact_error():
    """sdk/huffman.py decode(): ``count <= 8 * len(data)`` is the only bound before the loop, but a
    symbol may take up to ``top`` bits; with 8-bit codes the cursor runs past ``data + 3`` padding
    bytes and ``padded[b + 2]`` raises IndexError (pre-existing on main; reachable from a weights.dc
    record through CodedTensor.values / expand_model: a mutation fuzz of a valid container hit it
    28 times in 40 000)."""
    from sdk import huffman as H

    with pytest.raises(ArtifactError):
        H.decode(b"\0", [8] * 256, 8)


def test_huffman_container_overrun_is_an_artifact_error():
    """The same through a whole container: one tensor whose symbol stream is 1 byte for 8 entries of
    an 8-bit code."""
    from sdk import huffman as H

    rng = np.random.default_rng(0)
    values = rng.integers(-127, 128, size=64).astype(np.int8)
    values[values == 0] = 1
    model = values.tobytes()
    t = H.encode_tensor(values, "w", 0, diff_bits=1)
    blob = H.write_container([t], model)
    read = H.read_container(blob)[2][0]
    assert read.symbol_lengths.max() >= 6
    # rebuild the record with a 1-byte symbol stream for 8 entries
    import dataclasses
    bad = dataclasses.replace(read, entries=8, symbol_stream=b"\0")
    with pytest.raises(ArtifactError):
        bad.values()
