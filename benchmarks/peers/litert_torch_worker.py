"""Peer worker: litert-torch (PyTorch -> LiteRT) int8, timed beside edgepack's ``.tflite``.

Runs in the litert-torch venv (``../shared/tools/peer-venv``), never in edgepack's:

    <peer python> benchmarks/peers/litert_torch_worker.py --job job.json --result result.json

Recipe (litert-torch's PT2E static int8 flow, as in its docs and tests):
``torch.export.export(model).module()`` -> ``prepare_pt2e`` with
``PT2EQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))``
-> the 32 calibration batches -> ``convert_pt2e(fold_quantize=False)`` ->
``litert_torch.convert(..., quant_config=QuantConfig(pt2e_quantizer=...))`` ->
``export(<file>.tflite)``.  That whole chain is the deploy time; one untimed
conversion of a tiny Linear model runs first, so one-time process costs
(first export, MLIR set-up) are not charged to the model.

The model arrives as the main process's ``torch.export.save`` archive and is
turned back into a module with ``torch.export.load(...).module()`` (untimed:
it stands for the user's ``nn.Module``).  Both ``.tflite`` files then run on
the same LiteRT (``ai_edge_litert``, default XNNPACK delegate, 1 thread) in
this process, timed interleaved in rounds.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

import torch  # noqa: E402
import litert_torch  # noqa: E402
from litert_torch.quantize import pt2e_quantizer  # noqa: E402
from litert_torch.quantize.quant_config import QuantConfig  # noqa: E402
from torchao.quantization.pt2e import quantize_pt2e  # noqa: E402


def convert(module: torch.nn.Module, example: tuple, calibration, out: Path) -> Path:
    """litert-torch's PT2E int8 flow, per-channel symmetric weights; writes ``out``."""
    m = torch.export.export(module, example).module()
    quantizer = pt2e_quantizer.PT2EQuantizer().set_global(
        pt2e_quantizer.get_symmetric_quantization_config(is_per_channel=True))
    m = quantize_pt2e.prepare_pt2e(m, quantizer)
    with torch.no_grad():
        for batch in calibration:
            m(*batch)
    m = quantize_pt2e.convert_pt2e(m, fold_quantize=False)
    edge = litert_torch.convert(m, example, quant_config=QuantConfig(pt2e_quantizer=quantizer))
    edge.export(str(out))
    return out


def main(job: dict) -> dict:
    torch.manual_seed(0)
    work, data, example, calibration = _common.job_tensors(job)
    _common.warm_up(convert, work / "warmup-litert-torch.tflite")

    module = torch.export.load(job["program"]).module()
    path, deploy_s = _common.timed(lambda: convert(module, example, calibration,
                                                   work / f"{job['model']}-litert-torch.tflite"))

    peer = _common.LiteRTModel(path, job.get("threads", 1))
    ours = _common.edgepack_model(job)
    outputs = [peer.run([x]) for x in data["inputs"]]
    peer.set_inputs([data["inputs"][0]])
    ours.set_inputs([data["inputs"][0]])
    rounds = _common.time_interleaved({"edgepack": ours.invoke, "litert-torch": peer.invoke},
                                      job["runs"], job["rounds"], job["warmup"])
    return {
        "side": "litert-torch",
        "deploy_s": round(deploy_s, 3),
        "bytes": _common.file_bytes(path),
        "artifact": str(path),
        "io": sorted(set(peer.io_dtypes)),
        **peer.partitions(),
        "latency_rounds_ms": rounds,
        "outputs_npz": _common.save_outputs(work / "outputs-litert-torch.npz", outputs),
        "versions": _common.versions("litert-torch", "torch", "torchao", "ai-edge-litert"),
    }


if __name__ == "__main__":
    _common.run_worker(main, __doc__.splitlines()[0])
