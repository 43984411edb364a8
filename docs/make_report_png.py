"""Make ``docs/report.png``: the README's picture of ``edgepack report``.

    .venv/bin/python docs/make_report_png.py [work_dir]

Trains the digits LeNet, prunes it with the ``sensitivity`` stage (60 % of the
weights, then one fine-tuning epoch), packs it for arm-fp32 and arm-int8,
writes the comparison report against the pruned float model on 64 test
digits (``work_dir/report.html``), and renders the top of the page in headless
Chromium at 5/6 scale: 1000 pixels wide (``docs/report.png``).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import sdk  # noqa: E402
from examples import digits  # noqa: E402
from examples.models import make  # noqa: E402
from sdk.trainer import make_loader  # noqa: E402

RECIPE = {"stages": [{"method": "sensitivity", "config": {"sparsity": 0.6, "finetune_epochs": 1, "lr": 1e-3,
                                                          "progress": False}}]}
PAGE = (1200, 3300)      # the part of the page shown, in CSS pixels; drawn at 5/6 scale: 1000 pixels wide
# CSS selectors of what the picture leaves out
HIDE = "#compute, #size table, #latency table, #fidelity table, #layer-errors, #stages details"


def main(work: Path) -> Path:
    torch.manual_seed(0)
    torch.set_num_threads(1)
    xtr, ytr, xte, yte = digits.load()
    model = digits.train(make("lenet", randomize_bn=False)[0].train(), xtr, ytr, epochs=10, progress=False)
    train = list(make_loader(xtr, ytr, batch_size=64, seed=0))
    pruned = sdk.compress(model, RECIPE, data={"train": train, "val": [(xte[:225], yte[:225])]})
    cal = [xtr[i:i + 1] for i in range(32)]
    arts = [sdk.deploy(pruned, target=t, example_inputs=(xte[:1],), calibration=cal, output=work / t,
                       overwrite=True, progress=False) for t in ("arm-fp32", "arm-int8")]
    html = sdk.report.build_report(arts, work / "report.html", model=pruned.eval(),
                                   inputs=[xte[225 + i:226 + i] for i in range(64)], overwrite=True,
                                   title="edgepack report: digits LeNet, sensitivity-pruned, arm-fp32 vs arm-int8")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        raise SystemExit("chromium is not installed: apt-get install chromium")
    # the picture leaves out the long tables: the page's sections are <section id=...> elements
    page = work / "page.html"
    page.write_text(html.read_text().replace("</head>", f"<style>{HIDE}{{display:none}}</style></head>", 1))
    out = ROOT / "docs" / "report.png"
    subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                    "--force-device-scale-factor=0.8333", f"--screenshot={out}", f"--window-size={PAGE[0]},{PAGE[1]}",
                    page.as_uri()], check=True, capture_output=True, timeout=300)
    print(f"wrote {out} ({out.stat().st_size // 1024} KB) from {html}")
    return out


if __name__ == "__main__":
    import sdk.report  # noqa: F401 - sdk.report is not imported by `import sdk`

    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(tempfile.mkdtemp(prefix="edgepack-report-")))
