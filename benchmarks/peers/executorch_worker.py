"""Peer worker: ExecuTorch (XNNPACK backend) int8, timed beside edgepack's ``.tflite``.

Runs in the ExecuTorch venv (``../shared/tools/executorch-venv``), never in edgepack's:

    <executorch python> benchmarks/peers/executorch_worker.py --job job.json --result result.json

Recipe (ExecuTorch's XNNPACK int8 flow, as in its docs):
``torch.export.export(model).module()`` -> ``prepare_pt2e`` with
``XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))``
-> the 32 calibration batches -> ``convert_pt2e`` -> ``torch.export.export`` ->
``to_edge_transform_and_lower(partitioner=[XnnpackPartitioner()])`` ->
``to_executorch()`` -> ``<file>.pte``.  That whole chain is the deploy time; one
untimed conversion of a tiny Linear model runs first, so one-time process costs
are not charged to the model.

The model arrives as the main process's ``torch.export.save`` archive (this venv
has no torchvision, and needs none: the archive holds the graph and the
weights).  The ``.pte`` runs on ExecuTorch's pybindings runtime
(``portable_lib``, thread pool reset to 1 thread before loading); edgepack's
``.tflite`` runs in this same process on ``ai_edge_litert`` (XNNPACK delegate,
1 thread), and the two are timed interleaved in rounds.  The ExecuTorch call
timed is ``forward(inputs, clone_outputs=False)``, which also copies the input
in (LiteRT's timed ``invoke()`` does not: microseconds at these sizes).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402

import torch  # noqa: E402
from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner  # noqa: E402
from executorch.backends.xnnpack.quantizer.xnnpack_quantizer import (  # noqa: E402
    XNNPACKQuantizer,
    get_symmetric_quantization_config,
)
from executorch.devtools.backend_debug import get_delegation_info  # noqa: E402
from executorch.exir import to_edge_transform_and_lower  # noqa: E402
from executorch.extension.pybindings import portable_lib  # noqa: E402
from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e  # noqa: E402


def convert(module: torch.nn.Module, example: tuple, calibration, out: Path) -> tuple[Path, dict]:
    """ExecuTorch's XNNPACK int8 flow, per-channel symmetric weights; writes ``out``.
    Also returns the delegation summary of the lowered graph."""
    m = torch.export.export(module, example).module()
    quantizer = XNNPACKQuantizer().set_global(get_symmetric_quantization_config(is_per_channel=True))
    m = prepare_pt2e(m, quantizer)
    with torch.no_grad():
        for batch in calibration:
            m(*batch)
    m = convert_pt2e(m)
    edge = to_edge_transform_and_lower(torch.export.export(m, example), partitioner=[XnnpackPartitioner()])
    info = get_delegation_info(edge.exported_program().graph_module)   # before to_executorch adds alloc nodes
    program = edge.to_executorch()
    out.write_bytes(program.buffer)
    # "getitem" only unpacks the outputs of a delegate call, "alloc" is memory planning: not ops left outside
    outside = {op: b.non_delegated for op, b in info.delegation_by_operator.items()
               if b.non_delegated and op not in ("getitem", "alloc")}
    return out, {"xnnpack_partitions": info.num_delegated_subgraphs,
                 "ops_outside_xnnpack": sum(outside.values()), "ops_outside": outside,
                 "ops_outside_names": sorted(outside),
                 "ops_delegated": info.num_delegated_nodes}


def main(job: dict) -> dict:
    torch.manual_seed(0)
    work, data, example, calibration = _common.job_tensors(job)
    _common.warm_up(convert, work / "warmup-executorch.pte")

    module = torch.export.load(job["program"]).module()
    (path, delegation), deploy_s = _common.timed(
        lambda: convert(module, example, calibration, work / f"{job['model']}-executorch.pte"))

    portable_lib._unsafe_reset_threadpool(int(job.get("threads", 1)))   # before loading the program
    program = portable_lib._load_for_executorch(str(path))
    outputs = [[y.float().numpy().copy() for y in program.forward((torch.from_numpy(x),))]
               for x in data["inputs"]]
    ours = _common.edgepack_model(job)
    ours.set_inputs([data["inputs"][0]])
    x0 = (torch.from_numpy(data["inputs"][0]),)
    rounds = _common.time_interleaved(
        {"edgepack": ours.invoke, "executorch": lambda: program.forward(x0, clone_outputs=False)},
        job["runs"], job["rounds"], job["warmup"])
    return {
        "side": "executorch",
        "deploy_s": round(deploy_s, 3),
        "bytes": _common.file_bytes(path),
        "artifact": str(path),
        "io": sorted({"float32", *(str(y.dtype).removeprefix("torch.") for y in program.forward(x0))}),
        **delegation,
        "threads": portable_lib._threadpool_get_thread_count(),
        "latency_rounds_ms": rounds,
        "outputs_npz": _common.save_outputs(work / "outputs-executorch.npz", outputs),
        "versions": _common.versions("executorch", "torch", "torchao", "ai-edge-litert"),
    }


if __name__ == "__main__":
    _common.run_worker(main, __doc__.splitlines()[0])
