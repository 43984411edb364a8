"""Target ``binary-popcount``: binary networks as C99 source running XNOR + popcount kernels.

A model binarized by ``xnor``, ``bnn``, ``bireal``, ``reactnet`` or ``horq`` (their layers call
``edgepack::binarize`` on activations and hold ±1 weights) lowers to a list of
layer specs (:mod:`.lowering`): binary convs/linears bit-packed along the
input channels into uint64 words with a float scale per output channel, and
the float layers around them (first conv, last linear, BatchNorm as
scale + bias, pools, and the activations between any layers: ReLU, PReLU,
Hardtanh/ReLU6/clamp).  The artifact is standalone source a firmware build can
take with any C99 compiler::

    model.c  model.h  weights.bin  ep_kernels.h  ep_isa.h  ep_*.c  layers.json

``model.h`` declares ``edgepack_model_run(input, output, weights)``; the
vector path (AVX-512 VPOPCNTDQ, AVX2, NEON, portable C) is picked from the
compiler's target flags.  ``layers.json`` describes the layers and where their
arrays lie in ``weights.bin``.  ``bwn`` layers (binary weights, float
activations) run as :class:`.specs.BwnConv`/:class:`.specs.BwnLinear`: their
signs packed one bit per weight along the outputs, each output a sequential sum
of the inputs added or subtracted by the weight's sign, times α, plus the bias.

Low-bit networks run bit-serially (``kernels/ep_bitserial.c``): k-bit weights
(``ternary``, ``dorefa``; any grid :func:`.packing.weight_planes` recognises) are
packed as k ±1 planes with integer coefficients, k-bit activations
(``edgepack::quantize_uniform``, DoReFa) and HORQ's residual planes
(``edgepack::residual_sign``) as k ±1 planes, and one XNOR-popcount convolution
multiplies every pair of planes before integer weights combine them
(:class:`.specs.BitSerialConv`).  Low-bit weights on float activations run one
sign-selected sum per plane (:class:`.specs.PlaneWeightConv`).

The C files are shipped for firmware builds; edgepack itself never compiles or
loads anything an artifact contains.  Its runners (:mod:`.runners`) read
``layers.json`` and ``weights.bin`` as untrusted data through a strict
validator, refuse an artifact whose ``model.c``/``model.h`` differ from what
this edgepack generates from them or whose ``ep_*`` files differ from the
kernels installed with it, and the ``host`` runner compiles only that freshly
generated C with the installed kernels, through a compile cache that loads
only shared objects it signed (:mod:`.build`).  A tampered artifact, even one
whose manifest hashes were rewritten, gets an ``ArtifactError`` that says to
deploy again.

Outputs are float, so :meth:`verify_rules` compare with the binary torch model
(the one after the quantizer) by relative error and top-1 agreement; that the
compiled kernels' integer popcounts equal the reference's bit for bit is
checked per layer by :func:`binary_layer_agreement`.

>>> art = sdk.deploy(model, "binary-popcount", (x,), recipe={"stages": [{"method": "xnor"}]},
...                  data=train_batches)                                  # doctest: +SKIP
>>> art.verify(sdk.compress(...)).passed                                   # doctest: +SKIP
True
"""

from __future__ import annotations

import dataclasses

from sdk import Package, Target, TensorSig, hookimpl
from sdk.config import Config
from sdk.cost import ARM_A76
from sdk.encoding import Carries
from sdk.errors import ArtifactError, ConfigError

from .qemu import QemuRunner
from .runners import LAYERS_FILE, HostRunner, ReferenceRunner, binary_layer_agreement, dump_specs, load_specs

__all__ = ["BinaryPopcount", "binary_layer_agreement"]


class BinaryPopcount(Target):
    """Binary layers as XNOR + popcount over bit-packed channels, in generated C."""

    name = "binary-popcount"
    version = "1.0"

    # "binary" is descriptive: the graph holds binarized weights as float ±α constants (no plan
    # spec asks for it), which the lowering packs to bits; check_plan and cost say so per layer
    carries = (Carries("binary", bits=(1, 2, 3, 4, 5, 6, 7, 8)), Carries("float32"))
    device = ARM_A76

    @dataclasses.dataclass(frozen=True)
    class Config(Config):
        pass

    def check(self, graph):
        from .lowering import lower

        lower(graph, self.name)

    def check_plan(self, graph, plan):
        """The core's rows (which refuse a plan this target cannot ship), with each binary
        layer's weight said as the lowering stores it: 1-bit signs packed in uint64 words
        (in bytes along the outputs for bwn layers), plus its float32 scales."""
        from .lowering import lower
        from .specs import BinaryLayer, BinaryWeightLayer, BitSerialLayer, PlaneWeightLayer

        low, binary = lower(graph, self.name), {}
        for spec, name in zip(low.specs, low.names, strict=True):
            if isinstance(spec, (BinaryLayer, BinaryWeightLayer)):
                node, alpha = graph.node(name), (spec.alpha if spec.alpha.ndim == 1 else spec.alpha[-1])
                planes = spec.planes if isinstance(spec, (BitSerialLayer, PlaneWeightLayer)) else 1
                scale = "float32 scale per output channel" if (alpha != alpha[0]).any() else f"scale {alpha[0]:g}"
                what = "1-bit signs" if planes == 1 else f"{planes} bit planes of signs"
                binary[node.inputs[1]] = {"layer": node.module or node.name, "tensor": node.inputs[1],
                                          "planned": f"binary ({what}, {scale})", "bits": planes,
                                          "stored_bits": planes}
        rows = [binary.pop(r["tensor"], r) for r in super().check_plan(graph, plan)]
        return rows + list(binary.values())       # binary layers without a hint (built by hand)

    def cost(self, graph, plan, encodings=None):
        """One row per lowered layer, as :func:`sdk.cost.layer_costs` gives them: binary layers
        in format ``binary`` (their XNOR-popcount ``bops``, packed weights and scales), the rest
        float32 (bwn layers too: their ``macs`` are the sign-selected float adds); weight bytes are those the layer's arrays take in ``weights.bin``.  The lowering
        knows how every weight is stored, so ``encodings`` is not needed."""
        from sdk.cost import roofline

        from .lowering import lower
        from .specs import BinaryLayer, infer_shapes

        low = lower(graph, self.name)
        rows = []
        for spec, info, layer in zip(low.specs[1:], infer_shapes(low.specs)[1:], low.layers, strict=True):
            fmt = "binary" if isinstance(spec, BinaryLayer) else "float32"
            latency_us, energy_uj = roofline(self.device, fmt, layer["bops"] if fmt == "binary" else layer["macs"],
                                             layer["bytes"], info.nbytes)
            rows.append({"name": layer["name"], "module": layer["module"], "op": layer["op"], "format": fmt,
                         "params": layer["params"], "weight_bytes": layer["bytes"], "macs": layer["macs"],
                         "bops": layer["bops"], "est_latency_us": latency_us, "est_energy_uj": energy_uj})
        return rows

    def pack(self, graph, plan, calibration=None):
        from .blob import write_weights_bin
        from .build import kernel_sources
        from .emit import generate_sources
        from .lowering import lower

        low = lower(graph, self.name)
        model_c, model_h = generate_sources(low.specs)
        weights, layers = write_weights_bin(low.specs), dump_specs(low.specs, low.names)
        try:
            load_specs(layers, weights)
        except ArtifactError as exc:   # the runners' bounds: never write an artifact they would refuse
            raise ConfigError(f"{self.name} cannot pack this model: {exc}") from None
        files = {"model.c": model_c.encode(), "model.h": model_h.encode(),
                 "weights.bin": weights, LAYERS_FILE: layers}
        files.update({p.name: p.read_bytes() for p in kernel_sources()})
        (iname, ishape, _), oname = graph.inputs[0], graph.outputs[0]
        binary = [r["name"] for r in low.layers if "Binary" in r["op"]]
        return Package(files=files, inputs=[TensorSig(iname, tuple(ishape), "float32")],
                       outputs=[TensorSig(oname, tuple(graph.shape(oname)), "float32")], layers=low.layers,
                       extra={"binary_layers": binary})

    def verify_rules(self):
        # Float rounding differs between torch and C (BatchNorm, the first conv), and a
        # value that lands on a sign threshold can flip one bit of a popcount: 1e-2
        # absorbs such a flip, while a real fault (a scale, a layout) is off by O(1).
        return {"max_rel_err": 1e-2, "min_top1_agreement": 0.99}


@hookimpl
def register_targets(register):
    register(BinaryPopcount)


@hookimpl
def register_runners(register):
    register(HostRunner)
    register(ReferenceRunner)
    register(QemuRunner)
