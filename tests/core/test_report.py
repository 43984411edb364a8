"""sdk.report / `edgepack report`: one self-contained HTML page about a sensitivity-pruned digits LeNet
packed for arm-fp32 and arm-int8.  The page embeds every chart as a PNG data URI and links nothing;
its size figures equal the bytes counted from the model's layer shapes and the files on disk, its
SQNR equals one computed here with numpy from art.run against the float model, its timings hold the
runs asked for; output paths are refused inside an artifact and never overwritten unasked; headless
Chromium renders it to a page with the charts' colours on it."""

import base64
import html.parser
import json
import math
import shutil
import subprocess
import sys
import types

import numpy as np
import pytest
import torch

import sdk
from examples import digits as D
from examples.models import make
from sdk.cli import main
from sdk.errors import EdgepackError, InputError, ToolchainError
from sdk.report import _PALETTE, _PARTS, build_report, size_breakdown, time_runner

pytest.importorskip("matplotlib", reason="the report's charts need matplotlib: pip install edgepack[report]")
pytestmark = pytest.mark.usefixtures("one_thread")

RUNNERS = ["host", "reference"]
PNG = b"\x89PNG\r\n\x1a\n"


class Page(html.parser.HTMLParser):
    """The parts of the report the tests read: images, tables (rows of cell texts), headings, links."""

    def __init__(self, text):
        super().__init__()
        self.images, self.tables, self.headings, self.refs, self.tags = [], [], [], [], set()
        self._cell = self._heading = None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        self.tags.add(tag)
        self.refs += [v for k, v in attrs if k in ("src", "href") and not (tag == "img" and k == "src")]
        if tag == "img":
            self.images.append((a.get("src", ""), a.get("alt", "")))
        elif tag == "table":
            self.tables.append([])
        elif tag == "tr":
            self.tables[-1].append([])
        elif tag in ("td", "th"):
            self._cell = ""
        elif tag in ("h1", "h2", "h3", "h4"):
            self._heading = ""

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.tables[-1][-1].append(self._cell.strip())
            self._cell = None
        elif tag in ("h1", "h2", "h3", "h4") and self._heading is not None:
            self.headings.append(self._heading.strip())
            self._heading = None

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data
        if self._heading is not None:
            self._heading += data

    def table(self, first_header):
        """The rows (dicts by header) of every table whose first header cell is ``first_header``."""
        return [dict(zip(t[0], r)) for t in self.tables if t and t[0] and t[0][0] == first_header for r in t[1:]]


@pytest.fixture(scope="module")
def setup(digits, tmp_path_factory):
    """A LeNet trained 1 epoch, sensitivity-pruned to 60 % (the val stream: half the test set), packed
    for arm-fp32 and arm-int8; the pruned float model; 8 test inputs of batch 1."""
    xtr, ytr, xte, yte = digits
    torch.manual_seed(0)
    model = D.train(make("lenet", randomize_bn=False)[0].train(), xtr, ytr.long(), epochs=1, progress=False)
    recipe = {"stages": [{"method": "sensitivity", "config": {"sparsity": 0.6, "progress": False}}]}
    pruned = sdk.compress(model, recipe, data={"val": [(xte[:200], yte[:200].long())]})
    where = tmp_path_factory.mktemp("report")
    cal = [xtr[i:i + 1] for i in range(16)]
    arts = [sdk.deploy(pruned, target=t, example_inputs=(xte[:1],), calibration=cal, output=where / t,
                       progress=False) for t in ("arm-fp32", "arm-int8")]
    inputs = [xte[200 + i:201 + i] for i in range(8)]
    return arts, pruned.eval(), inputs, where


@pytest.fixture
def no_drawing(monkeypatch):
    """Charts as a fixed 1-pixel PNG: for the tests of what is around them (paths, CLI, messages),
    which need not spend a second per report drawing (the charts are checked on ``report``)."""
    import sdk.report as R

    pixel = ("data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8DwHwAFBQIAX8jx0g"
             "AAAABJRU5ErkJggg==")
    monkeypatch.setattr(R._Charts, "uri", lambda self, fig: pixel)


@pytest.fixture(scope="module")
def report(setup):
    arts, model, inputs, where = setup
    out = build_report(arts, where / "cmp.html", model=model, inputs=inputs, runners=RUNNERS, repeats=7)
    return out, out.read_text()


def test_page_is_self_contained(report):
    path, text = report
    page = Page(text)
    assert "http://" not in text and "https://" not in text
    assert not page.tags & {"script", "link", "iframe", "object", "embed"}
    assert all(r.startswith("#") for r in page.refs), page.refs          # only in-page anchors
    alts = [alt for _, alt in page.images]
    for want in ("artifact size breakdown", "size per layer", "MACs per layer", "latency per runner",
                 "output SQNR per runner", "sensitivity curves"):
        assert want in alts, (want, alts)
    for src, alt in page.images:
        assert src.startswith("data:image/png;base64,"), alt
        data = base64.b64decode(src.split(",", 1)[1], validate=True)
        assert data.startswith(PNG) and len(data) > 2000, alt
    for h in ("Size", "Compute", "Latency", "Fidelity", "Per-layer errors", "Recipe stages", "1. sensitivity"):
        assert h in page.headings, h


def test_size_tables_count_the_layers_bytes(setup, report):
    arts, model, _, _ = setup
    fp32, int8 = arts
    page = Page(report[1])
    layers = {r["layer"]: r for r in page.table("layer") if "arm-fp32 weights (B)" in r}
    modules = {r["name"]: r["module"] for r in int8.profile["layers"]}
    assert sorted(layers) == ["conv2d", "conv2d_1", "linear", "linear_1"]      # torch.export's node names
    for art, width, bias in ((fp32, 4, 4), (int8, 1, 4)):                      # float32 / int8 weights, int32 bias
        shipped = {e["layer"]: (e.get("sparsity") or {}).get("shipped") for e in art.manifest["encodings"]}
        for name, row in layers.items():
            m = model.get_submodule(modules[name])
            w, out_ch = m.weight.detach(), m.weight.shape[0]
            idx = int(row.get(f"{art.path.name} sparse idx (B)", 0))
            if shipped.get(modules[name]) == "sparse":   # only the nonzero weights stored, plus their indices
                assert idx > 0
                assert int(row[f"{art.path.name} weights (B)"]) - idx == width * int((w != 0).sum()) + bias * out_ch
            else:
                assert idx == 0
                assert int(row[f"{art.path.name} weights (B)"]) == width * w.numel() + bias * out_ch
        # int8: one float32 scale and one int64 zero point per channel for weights and bias, and one pair for
        # the layer's output activation (per tensor; the profile names the tensor it lives in)
        assert all("tensor" in r for r in art.profile["layers"])
        for name, row in layers.items():
            out_ch = model.get_submodule(modules[name]).weight.shape[0]
            assert int(row[f"{art.path.name} quant (B)"]) == (0 if art is fp32 else (2 * out_ch + 1) * (4 + 8))
    assert any(e.get("sparsity", {}).get("shipped") == "sparse" for e in fp32.manifest["encodings"])
    for art in arts:
        s = size_breakdown(art)
        on_disk = {p.name: p.stat().st_size for p in art.path.iterdir()}
        assert s.weights + s.quantization + s.structure == on_disk["model.tflite"]
        assert s.model_files == {"model.tflite": on_disk["model.tflite"]}
        assert sum(s.bookkeeping.values()) == sum(on_disk.values()) - on_disk["model.tflite"]
        assert 0 < s.structure < 0.2 * on_disk["model.tflite"]
    totals = {r["artifact"]: r for r in page.table("artifact") if "structure (B)" in r}
    assert int(totals["arm-int8"]["model files (B)"]) == (int8.path / "model.tflite").stat().st_size
    assert int(totals["arm-fp32"]["quantization params (B)"]) == 0


def test_fidelity_is_measured_against_the_float_model(setup, report):
    arts, model, inputs, _ = setup
    page = Page(report[1])
    rows = {(r["artifact"], r["runner"]): r for r in page.table("artifact") if "SQNR vs float (dB)" in r}
    assert set(rows) == {(a, r) for a in ("arm-fp32", "arm-int8") for r in RUNNERS}
    with torch.no_grad():
        ref = np.concatenate([model(x).numpy().ravel() for x in inputs]).astype(np.float64)
    for art in arts:
        got = np.concatenate([art.run(x)[0].ravel() for x in inputs]).astype(np.float64)
        sqnr = 10 * math.log10(np.sum(ref ** 2) / np.sum((ref - got) ** 2))
        cell = rows[(art.path.name, "host")]["SQNR vs float (dB)"]
        assert float(cell) == pytest.approx(sqnr, abs=0.01 * abs(sqnr))
        assert float(rows[(art.path.name, "host")]["max abs err vs float"]) == pytest.approx(
            np.abs(ref - got).max(), rel=1e-3)
        assert "float model" in rows[(art.path.name, "host")]["compared with"]
    assert float(rows[("arm-int8", "host")]["bit-exact vs reference"]) >= 0.99
    assert float(rows[("arm-fp32", "host")]["SQNR vs float (dB)"]) > float(rows[("arm-int8", "host")]
                                                                         ["SQNR vs float (dB)"]) > 20
    assert "given input(s)" in report[1] and "8 given" in report[1]


def test_latency_rows_hold_the_runs(report):
    page = Page(report[1])
    rows = [r for r in page.table("artifact") if "median ms" in r]
    timed = {(r["artifact"], r["runner"]): r for r in rows if r["measured"] == "wall per call"}
    assert set(timed) == {(a, r) for a in ("arm-fp32", "arm-int8") for r in RUNNERS}
    for r in timed.values():
        lo, q1, med, q3, hi = (float(r[k]) for k in ("min ms", "q1 ms", "median ms", "q3 ms", "max ms / why"))
        assert 0 < lo <= q1 <= med <= q3 <= hi and int(r["runs"]) >= 3


def test_time_runner_counts_and_budget():
    import time

    slept = time_runner(lambda s: time.sleep(0.002), [None], repeats=6)
    assert len(slept.wall_ms) == 6 and min(slept.wall_ms) >= 2.0
    capped = time_runner(lambda s: time.sleep(0.03), [None], repeats=100, budget_s=0.05)
    assert 3 <= len(capped.wall_ms) <= 4            # the budget ends it; at least min_runs=3


def test_stage_report_tables(setup, report):
    page = Page(report[1])
    units = {r["name"]: r for r in page.table("name") if "counts" in r}
    rec = next(s for s in setup[0][1].manifest["stages"] if s["method"] == "sensitivity")
    assert set(units) == {u["name"] for u in rec["units"]}
    for u in rec["units"]:
        assert int(units[u["name"]]["pruned"]) == u["pruned"]
    fields = {r["field"]: r["value"] for r in page.table("field")}
    assert float(fields["sparsity"]) == pytest.approx(0.6, abs=1e-3)
    assert "base.accuracy" in fields and "after_pruning.accuracy" in fields
    enc = [r for r in page.table("layer") if "density" in r]
    assert {r["layer"] for r in enc} >= {"features.0", "features.4", "classifier.1", "classifier.3"}
    # the stages are the same for both artifacts (one compressed model): shown once, for both
    assert "arm-fp32, arm-int8" in page.headings


def test_layer_errors_line_when_unavailable(setup, no_drawing, tmp_path, monkeypatch):
    arts = setup[0]
    failing = types.ModuleType("sdk.layer_errors")

    def layer_errors(artifact, model=None, inputs=None):
        raise InputError("this target has no integer reference")

    failing.layer_errors = layer_errors
    monkeypatch.setitem(sys.modules, "sdk.layer_errors", failing)
    text = build_report(arts[1], tmp_path / "a.html", runners=["reference"], repeats=3).read_text()
    assert "per-layer errors unavailable: InputError: this target has no integer reference" in text


def test_artifact_method_without_model_says_what_was_compared(setup, no_drawing, tmp_path):
    art = setup[0][1]
    out = art.report(tmp_path / "one.html", runners=["reference"], repeats=3)
    text = out.read_text()
    assert "No float model and no inputs were given" in text and "Not checked" in text
    rows = [r for r in Page(text).table("artifact") if "SQNR vs golden (dB)" in r]
    assert [r["runner"] for r in rows] == ["reference"] and rows[0]["SQNR vs float (dB)"] == "–"
    assert float(rows[0]["SQNR vs golden (dB)"]) > 20


def test_output_rules(setup, no_drawing, tmp_path, monkeypatch):
    art = setup[0][0]
    with pytest.raises(InputError, match="inside the artifact"):
        build_report(art, art.path / "r.html", runners=["reference"])
    sdk.load(art.path)                                   # untouched: still loads
    out = tmp_path / "r.html"
    out.write_text("mine")
    with pytest.raises(InputError, match="already exists"):
        build_report(art, out, runners=["reference"], repeats=3)
    assert out.read_text() == "mine"
    build_report(art, out, runners=["reference"], repeats=3, overwrite=True)
    assert out.read_text().startswith("<!DOCTYPE html>")
    with pytest.raises(InputError, match="unknown runner"):
        build_report(art, tmp_path / "x.html", runners=["hots"])
    with pytest.raises(InputError, match=r"has shape \(1, 1, 4, 4\)"):
        build_report(art, tmp_path / "x.html", inputs=[torch.randn(1, 1, 4, 4)], runners=["reference"])
    monkeypatch.chdir(tmp_path)
    made = build_report(art, runners=["reference"], repeats=3)
    assert made == tmp_path / "arm-fp32-report.html" and made.is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["arm-fp32-report.html", "r.html"]   # no temp files


def test_strings_from_the_artifact_are_escaped(setup, no_drawing, tmp_path):
    """An artifact comes from somewhere else: its stage reports, layer names and target config
    end up as text on the page, never as markup or links."""
    src = tmp_path / "hostile"
    shutil.copytree(setup[0][1].path, src)
    manifest = json.loads((src / "manifest.json").read_text())
    evil = '<script>alert(1)</script><img src="https://x.example/t.png">'
    manifest["stages"] = [{"method": evil, evil: [{"name": evil, "loss": 1.0}], "note": evil}]
    (src / "manifest.json").write_text(json.dumps(manifest))
    text = build_report(sdk.load(src), tmp_path / "r.html", runners=["reference"], repeats=3).read_text()
    page = Page(text)
    assert "script" not in page.tags and all(src.startswith("data:") for src, _ in page.images)
    assert "<script>" not in text and "&lt;script&gt;alert(1)&lt;/script&gt;" in text
    assert not [r for r in page.refs if not r.startswith("#")]


def test_chart_labels_from_the_artifact_are_plain_text(setup, tmp_path):
    """A name matplotlib would parse as (broken) mathtext is drawn as it is, not an error."""
    src = tmp_path / "dollars"
    shutil.copytree(setup[0][1].path, src)
    manifest = json.loads((src / "manifest.json").read_text())
    name = r"$\foo{$"
    manifest["stages"] = [{"method": "sensitivity", "levels": [0.5], "units": [{"name": name, "loss": [1.0]}]}]
    (src / "manifest.json").write_text(json.dumps(manifest))
    text = build_report(sdk.load(src), tmp_path / "r.html", runners=["reference"], repeats=3).read_text()
    assert "sensitivity curves" in {alt for _, alt in Page(text).images}


def test_different_models_are_refused(setup, tmp_path):
    other = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 3)).eval()
    x = torch.randn(1, 1, 4, 4)
    art = sdk.deploy(other, target="arm-fp32", example_inputs=(x,), output=tmp_path / "other", progress=False)
    with pytest.raises(InputError, match="one model"):
        build_report([setup[0][0], art], tmp_path / "x.html")


def test_missing_matplotlib_is_a_named_error(setup, tmp_path, monkeypatch):
    for mod in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, mod, None)
    with pytest.raises(ToolchainError, match=r"pip install edgepack\[report\]") as info:
        build_report(setup[0][0], tmp_path / "r.html")
    assert isinstance(info.value, EdgepackError) and not (tmp_path / "r.html").exists()


def test_cli(setup, no_drawing, tmp_path, capsys):
    arts, model, inputs, _ = setup
    npz, pt2 = tmp_path / "in.npz", tmp_path / "m.pt2"
    np.savez(npz, x=torch.cat(inputs[:4]).numpy())
    torch.export.save(torch.export.export(model, (inputs[0],)), pt2)
    out = tmp_path / "cli.html"
    argv = ["report", *(str(a.path) for a in arts), "-o", str(out), "--inputs", str(npz), "--runner", "reference",
            "--repeats", "3"]
    assert main(argv + ["--model", str(pt2)]) == 0
    cap = capsys.readouterr()
    assert cap.out == f"wrote {out}\n"
    rows = [r for r in Page(out.read_text()).table("artifact") if "SQNR vs float (dB)" in r]
    assert len(rows) == 2 and all("float model" in r["compared with"] and float(r["SQNR vs float (dB)"]) > 20
                                  for r in rows)
    assert "4 given input(s)" in out.read_text()
    assert main(argv) == 2 and "already exists" in capsys.readouterr().err
    assert main(argv + ["--overwrite"]) == 0
    assert main(["report", str(arts[0].path), "-o", str(arts[0].path / "r.html")]) == 2
    assert "inside the artifact" in capsys.readouterr().err


def test_renders_in_headless_chromium(report, tmp_path):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("chromium is not installed: `apt-get install chromium` (make test does it as root)")
    import matplotlib.image

    shot = tmp_path / "shot.png"
    r = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                        f"--screenshot={shot}", "--window-size=1200,3000", report[0].as_uri()],
                       capture_output=True, text=True, timeout=120)
    assert shot.is_file(), r.stderr[-2000:]
    img = matplotlib.image.imread(shot)[:, :, :3]
    assert img.shape[:2] == (3000, 1200)
    rgb = np.round(img * 255).astype(np.int32)
    assert (rgb.min(axis=2) < 245).mean() > 0.08                   # not a blank page (measured: 0.19)
    packed = (rgb[:, :, 0] << 16) | (rgb[:, :, 1] << 8) | rgb[:, :, 2]
    assert len(np.unique(packed)) > 500                             # antialiased charts, not flat text

    def pixels(colour):
        want = np.array([int(colour[i:i + 2], 16) for i in (1, 3, 5)])
        return int((np.abs(rgb - want).max(axis=2) <= 6).sum())

    # the two artifacts' bars (per-layer size, MACs: measured 114k and 46k pixels) and the size breakdown's
    # weight and structure segments (38k, 4k) are drawn
    for colour, least in ((_PALETTE[0], 20000), (_PALETTE[1], 10000), (_PARTS["weights"], 10000),
                          (_PARTS["structure"], 1000)):
        assert pixels(colour) > least, colour


@pytest.mark.slow
@pytest.mark.emulation
def test_emulated_runner_reports_its_invoke_times(setup, emu, no_drawing, tmp_path):
    art = setup[0][1]
    text = build_report(art, tmp_path / "q.html", runners=["qemu-aarch64"], repeats=6).read_text()
    rows = {r["measured"]: r for r in Page(text).table("artifact") if r.get("runner") == "qemu-aarch64"
            and "median ms" in r}
    assert int(rows["wall per call"]["runs"]) == 6 and int(rows["emulated invoke"]["runs"]) == 6
    # the invoke inside the emulator is part of each call's wall time
    assert float(rows["emulated invoke"]["median ms"]) < float(rows["wall per call"]["median ms"])


@pytest.mark.slow
def test_binary_popcount_sizes_and_operations(tmp_path, no_drawing):
    """A binary-popcount artifact (C sources + weights.bin): scales travel with the weights, the
    C code is the structure, and the BOPs of the binary layers are on the page."""
    if shutil.which("cc") is None:
        pytest.skip("no C compiler")
    from examples.models import LeNet

    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(16, 1, 8, 8, generator=g), torch.randint(0, 4, (16,), generator=g)) for _ in range(2)]
    art = sdk.deploy(LeNet(4, width=8), "binary-popcount", (torch.randn(2, 1, 8, 8),), output=tmp_path / "bin",
                     recipe={"stages": [{"method": "xnor", "config": {"epochs": 1, "progress": False}}]},
                     data=data, progress=False)
    s = size_breakdown(art)
    on_disk = {p.name: p.stat().st_size for p in art.path.iterdir()}
    assert s.model_files == {n: b for n, b in on_disk.items() if n not in ("manifest.json", "profile.json",
                                                                          "golden.npz")}
    assert s.quantization is None and s.weights == sum(r["bytes"] for r in art.profile["layers"])
    assert s.weights <= on_disk["weights.bin"] and s.weights + s.structure == sum(s.model_files.values())
    text = build_report(art, tmp_path / "b.html", runners=["reference"], repeats=3).read_text()
    compute = {r["layer"]: r for r in Page(text).table("layer") if "bin BOPs" in r}
    binary = [r for r in art.profile["layers"] if r.get("bops")]
    assert binary and all(int(compute[r["name"]]["bin BOPs"]) == r["bops"] for r in binary)
    assert "scales with the weights" in text


def test_deep_compression_container_is_counted_once_per_file(small_cnn, tmp_path):
    """An int8 artifact with weights.dc (Deep Compression): the page names the skeleton + container
    sizes the weight-sharing stage recorded, and the parts add up to the files on disk."""
    recipe = {"stages": [{"method": "deep-compression", "config": {"sparsity": 0.8, "bits": 3}}]}
    x = torch.rand(8, 1, 8, 8)
    art = sdk.deploy(small_cnn, "arm-int8", (x[:1],), calibration=[x], recipe=recipe, output=tmp_path / "dc",
                     progress=False)
    s = size_breakdown(art)
    on_disk = {p.name: p.stat().st_size for p in art.path.iterdir()}
    assert s.model_files == {"model.tflite": on_disk["model.tflite"], "weights.dc": on_disk["weights.dc"]}
    assert s.weights + s.quantization + s.structure == on_disk["model.tflite"] + on_disk["weights.dc"]
    sizes = art.manifest["weight_container"]["sizes"]
    assert f"({sizes['skeleton']} B) and weights.dc: {sizes['skeleton'] + sizes['huffman']} B" in s.note
