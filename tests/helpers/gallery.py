"""The model gallery: real torchvision and timm CNNs and transformers, random init, eval mode, as users have them.

Shared by ``tests/targets/test_gallery.py`` and ``benchmarks/bench_gallery.py``.  Each entry
names the builder and an input resolution small enough for the suite (the
architectures are unchanged; 64×64 still leaves every stage at least 2×2).

torchvision on PyPI is a CUDA build: with the CPU torch its C++ extension does
not load, and ``import torchvision`` fails in ``torchvision/_meta_registrations.py``
with ``operator torchvision::nms does not exist`` because that file registers
fake kernels for two detection ops of the missing extension.  The model builders
are pure Python and never call those ops, so :func:`import_torchvision` defines
just their schemas (with a kernel that raises) and imports again — only when
the import failed for exactly that reason.

>>> model, x = build("resnet18")        # doctest: +SKIP
"""

from __future__ import annotations

import dataclasses
import re
import sys

import torch

#: the detection ops torchvision 0.28's _meta_registrations.py registers fake kernels for unconditionally
_DETECTION_OPS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_stub_library = None


def import_torchvision():
    """``torchvision``, importable even when its C++ extension does not load (see the module notes).

    Raises :class:`ImportError` when torchvision is not installed.
    """
    try:
        import torchvision
    except RuntimeError as exc:
        missing = re.search(r"operator torchvision::(\w+) does not exist", str(exc))
        if missing is None or missing.group(1) not in _DETECTION_OPS:
            raise
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]      # the half-run import
        _define_detection_ops()
        import torchvision
    return torchvision


def _define_detection_ops() -> None:
    global _stub_library
    if _stub_library is not None:
        return
    lib = torch.library.Library("torchvision", "DEF")
    for name, schema in _DETECTION_OPS.items():
        lib.define(schema)

        def unavailable(*args, _name=name, **kwargs):
            raise RuntimeError(f"torchvision::{_name} needs torchvision's C++ extension, which did not load with "
                               "this torch (the PyPI wheel is a CUDA build); only its schema is defined here")

        lib.impl(name, unavailable, "CompositeExplicitAutograd")
    _stub_library = lib           # a Library unregisters its ops when collected


@dataclasses.dataclass(frozen=True)
class Entry:
    name: str
    source: str          # "torchvision" or "timm"
    resolution: int = 64
    slow: bool = False   # heavy for the suite's 2-core budget
    transformer: bool = False   # layer norm / attention / GELU: int8 keeps those in float (see the lowering)

    def kwargs(self, resolution: int) -> dict:
        """Builder arguments: ViTs are built for the resolution they run at (their position
        embeddings have one entry per patch)."""
        if self.name == "vit_b_16":
            return {"image_size": resolution}
        if self.source == "timm" and self.name.startswith("vit_"):
            return {"img_size": resolution}
        return {}


GALLERY = [
    Entry("mobilenet_v2", "torchvision"),
    Entry("mobilenet_v3_small", "torchvision"),
    Entry("resnet18", "torchvision"),
    Entry("resnet50", "torchvision", slow=True),
    Entry("squeezenet1_1", "torchvision"),
    Entry("shufflenet_v2_x1_0", "torchvision"),
    Entry("efficientnet_b0", "torchvision", slow=True),
    Entry("mnasnet0_5", "torchvision", slow=True),
    Entry("regnet_y_400mf", "torchvision", slow=True),
    Entry("googlenet", "torchvision", slow=True),
    Entry("densenet121", "torchvision", slow=True),
    Entry("mobilenetv3_large_100", "timm", slow=True),
    Entry("efficientnet_lite0", "timm"),
    Entry("ghostnet_100", "timm", slow=True),
    Entry("lcnet_050", "timm"),
    Entry("convnext_tiny", "torchvision", slow=True, transformer=True),
    Entry("vit_b_16", "torchvision", slow=True, transformer=True),
    Entry("mobilevit_xxs", "timm", transformer=True),
]
BY_NAME = {e.name: e for e in GALLERY}


def build(name: str, seed: int = 0) -> tuple[torch.nn.Module, torch.Tensor]:
    """The model (random init, eval mode) and one example input ``1×3×R×R``.

    ViT's zero-initialised head gets random weights (else every output is 0).
    Batch-norm running statistics are estimated on random inputs first, as
    training leaves them: with the initial ones (mean 0, variance 1) the
    activations of these deep random nets shrink towards 1e-8 or grow layer
    after layer, which no trained model does (and which float16 cannot hold).
    """
    entry = BY_NAME[name]
    torch.manual_seed(seed)
    if entry.source == "torchvision":
        model = getattr(import_torchvision().models, name)(**entry.kwargs(entry.resolution))
    else:
        import_torchvision()       # timm imports torchvision
        import timm

        model = timm.create_model(name, **entry.kwargs(entry.resolution))
    if name == "vit_b_16":       # torchvision zero-initialises ViT's classifier: every output would be 0
        head = model.heads.head
        torch.nn.init.normal_(head.weight, std=head.in_features ** -0.5)
    g = torch.Generator().manual_seed(seed)
    _estimate_bn_statistics(model, [torch.randn(8, 3, entry.resolution, entry.resolution, generator=g)
                                    for _ in range(2)])
    return model.eval(), torch.randn(1, 3, entry.resolution, entry.resolution, generator=g)


def _estimate_bn_statistics(model: torch.nn.Module, batches) -> None:
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None          # cumulative average over the batches
    model.train()
    with torch.no_grad():
        for x in batches:
            model(x)
    model.eval()


def calibration(x: torch.Tensor, n: int = 4, seed: int = 1) -> list[torch.Tensor]:
    """``n`` random batches shaped like ``x``."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(x.shape, generator=g) for _ in range(n)]
