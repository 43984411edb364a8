"""``.pt2`` files: nothing in them is unpickled or loaded as code unless the user trusts the file,
and edgepack's own ops resolve when a binary model's file is loaded."""

import io
import json
import pickle
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from sdk.errors import EdgepackError, InputError
from sdk.pt2 import load_exported, unsafe_entries

ROOT = Path(__file__).resolve().parents[2]


class Net(torch.nn.Module):
    """A weight, a buffer and a lifted tensor constant: every payload kind a .pt2 holds."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 2)
        self.register_buffer("shift", torch.ones(2))

    def forward(self, x):
        return self.fc(x) + self.shift + torch.tensor([1.0, 2.0])


class _Payload:
    """Unpickling this creates ``path``: what a hostile sender's code would do."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _members(path):
    with zipfile.ZipFile(path) as z:
        return [(i.filename, z.read(i.filename)) for i in z.infolist()]


def _write(path, members):
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members:
            z.writestr(name, data)
    return path


def benign_pt2(tmp_path, name="good"):
    torch.manual_seed(0)
    path = tmp_path / f"{name}.pt2"
    torch.export.save(torch.export.export(Net().eval(), (torch.randn(3, 4),)), path)
    return path


def evil_pt2(tmp_path, marker, where="weight"):
    """A real torch.export.save() file with one member rewritten so that torch.export.load
    would unpickle a payload that creates ``marker``."""
    good = benign_pt2(tmp_path, f"base-{where}")
    members = _members(good)
    root = members[0][0].split("/")[0]
    raw = pickle.dumps(_Payload(marker), protocol=2)
    buf = io.BytesIO()
    torch.save(_Payload(marker), buf, pickle_protocol=4)       # torch.save's zip layout, STACK_GLOBAL opcodes
    zipped = buf.getvalue()
    out = []
    for name, data in members:
        rec = name[len(root) + 1:]
        if where in ("weight", "constant") and rec.endswith(f"_{where}s_config.json"):
            cfg = json.loads(data)
            entry = next(iter(cfg["config"].values()))
            entry["use_pickle"] = True
            data = json.dumps(cfg).encode()
            payload_name = entry["path_name"]
        elif where == "custom_obj" and rec.endswith("_constants_config.json"):
            cfg = json.loads(data)
            next(iter(cfg["config"].values()))["path_name"] = "custom_obj_0"
            data = json.dumps(cfg).encode()
        elif where == "sample-raw" and rec.startswith("data/sample_inputs/"):
            data = raw
        elif where == "sample-zip" and rec.startswith("data/sample_inputs/"):
            data = zipped
        out.append((name, data))
    if where in ("weight", "constant"):
        folder = f"{root}/data/{where}s/"
        out = [(n, raw if n == folder + payload_name else d) for n, d in out]
    if where == "custom_obj":
        out.append((f"{root}/data/constants/custom_obj_0", raw))
    if where == "aoti":
        out.append((f"{root}/data/aotinductor/model/model.so", b"\x7fELF"))
    if where == "outside-root":      # torch then falls back to its legacy, pickle-based layout
        out += [("version", b"1"), ("serialized_exported_program.json", b"{}")]
    if where == "case-twin":         # torch's zip reader ignores case: which twin would it read?
        out.append((f"{root}/DATA/SAMPLE_INPUTS/MODEL.PT", raw))
    return _write(tmp_path / f"evil-{where}.pt2", out)


KINDS = ["weight", "constant", "custom_obj", "sample-raw", "sample-zip", "aoti", "outside-root", "case-twin"]


@pytest.mark.parametrize("where", ["weight", "constant", "sample-raw", "sample-zip"])
def test_the_crafted_files_do_run_code_in_plain_torch(tmp_path, where):
    """The fixture is a real attack: torch.export.load itself creates the marker."""
    marker = tmp_path / "PWNED"
    path = evil_pt2(tmp_path, marker, where)
    code = (f"import torch\ntry:\n    torch.export.load({str(path)!r})\nexcept Exception:\n    pass\n")
    subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=300)
    assert marker.exists()


@pytest.mark.parametrize("where", KINDS)
def test_crafted_pt2_is_refused_and_never_unpickled(tmp_path, where):
    marker = tmp_path / "PWNED"
    path = evil_pt2(tmp_path, marker, where)
    with pytest.raises(InputError) as exc:
        load_exported(path)
    msg = str(exc.value)
    assert str(path) in msg and "trust_pickle=True" in msg and "--trust-pickle" in msg
    assert "only if you made this file yourself" in msg
    assert not marker.exists()


def test_message_names_the_entries(tmp_path):
    marker = tmp_path / "PWNED"
    bad = unsafe_entries(evil_pt2(tmp_path, marker, "weight").read_bytes())
    assert len(bad) == 1 and bad[0].startswith("data/weights/weight_") and "use_pickle" in bad[0]
    bad = unsafe_entries(evil_pt2(tmp_path, marker, "sample-zip").read_bytes())
    assert len(bad) == 1 and bad[0].startswith("data/sample_inputs/model.pt") and "weights_only=False" in bad[0]
    bad = unsafe_entries(evil_pt2(tmp_path, marker, "aoti").read_bytes())
    assert any("aotinductor" in b and "shared library" in b for b in bad)
    assert not marker.exists()


def test_benign_file_loads_with_and_without_trust(tmp_path):
    path = benign_pt2(tmp_path)
    assert unsafe_entries(path.read_bytes()) == []
    x = torch.randn(3, 4)
    a, b = load_exported(path), load_exported(path, trust_pickle=True)
    assert torch.equal(a.module()(x), b.module()(x))
    assert a.example_inputs[0][0].shape == (3, 4)


def test_trust_pickle_takes_the_normal_torch_path(tmp_path):
    """With trust_pickle=True nothing is checked: the pickled weight of a file you made loads."""
    path = benign_pt2(tmp_path)
    members = _members(path)
    root = members[0][0].split("/")[0]
    out = []
    for name, data in members:
        if name.endswith("_weights_config.json"):
            cfg = json.loads(data)
            entry = cfg["config"]["fc.bias"]
            entry["use_pickle"] = True
            data = json.dumps(cfg).encode()
            target = f"{root}/data/weights/{entry['path_name']}"
        out.append((name, data))
    buf = io.BytesIO()
    torch.save(torch.nn.Parameter(torch.tensor([5.0, 6.0])), buf)
    out = [(n, buf.getvalue() if n == target else d) for n, d in out]
    pickled = _write(tmp_path / "pickled.pt2", out)
    with pytest.raises(InputError, match="fc.bias"):
        load_exported(pickled)
    ep = load_exported(pickled, trust_pickle=True)
    assert ep.state_dict["fc.bias"].tolist() == [5.0, 6.0]


@pytest.mark.parametrize("content", [b"", b"not a zip", b"PK\x03\x04broken"])
def test_foreign_files_are_input_errors(tmp_path, content):
    path = tmp_path / "x.pt2"
    path.write_bytes(content)
    with pytest.raises(InputError, match="re-export"):
        load_exported(path)
    with pytest.raises(InputError):
        load_exported(path, trust_pickle=True)


def test_damaged_model_json_is_an_input_error(tmp_path):
    path = benign_pt2(tmp_path)
    out = [(n, b"{" if n.endswith("models/model.json") else d) for n, d in _members(path)]
    with pytest.raises(InputError, match="could not be loaded"):
        load_exported(_write(tmp_path / "broken.pt2", out))
    other = tmp_path / "a_torch_save.pt2"
    torch.save({"w": torch.ones(2)}, other)
    with pytest.raises(EdgepackError):
        load_exported(other)
    with pytest.raises(InputError, match="does not exist"):
        load_exported(tmp_path / "missing.pt2")
    with pytest.raises(InputError, match="path"):
        load_exported(None)
    with pytest.raises(InputError, match="True or False"):
        load_exported(benign_pt2(tmp_path), trust_pickle="no")


def test_binary_model_pt2_deploys_through_the_cli(tmp_path):
    """An xnor model's .pt2 names torch.ops.edgepack.* ops: a fresh `edgepack deploy` registers them."""
    from examples.models import LeNet
    from sdk.binary import BinaryInfo, binarize_model

    torch.manual_seed(0)
    net = LeNet(width=64)
    binarize_model(net, BinaryInfo("xnor", scale_weights=True, binary_activations=True, scale_activations=True))
    path = tmp_path / "xnor.pt2"
    torch.export.save(torch.export.export(net.eval(), (torch.randn(1, 1, 8, 8),)), path)
    out = tmp_path / "art"
    r = subprocess.run([sys.executable, "-m", "sdk", "deploy", str(path), "--target", "binary-popcount",
                        "-o", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr
    assert "wrote" in r.stdout and "Traceback" not in r.stderr
    assert (out / "manifest.json").is_file()
