"""Base classes of everything a plugin can provide.

Each is a small abstract class with a ``name``, a ``version``, a frozen
``Config`` dataclass and one verb:

=============  ==============================================================
Distiller      ``loss(student_out, teacher_out, target)`` and ``apply`` (train)
Pruner         ``apply(model, data)`` -> pruned model
Quantizer      ``calibrate(graph, batches)`` -> :class:`sdk.quant.QuantPlan`
               (post-training) or ``apply(model, data)`` (training-time)
Target         ``pack(graph, plan)`` -> :class:`Package` (files + signature)
Runner         ``open(artifact)`` -> callable running inputs to outputs
Optimizer      ``build(params)`` -> ``torch.optim.Optimizer`` (training stages)
=============  ==============================================================

Torch-side methods run through ``run(model, ctx)`` (:class:`sdk.context.StageContext`:
named data streams, teacher, penalties and callbacks for later stages); the
default calls ``apply`` with the ``train`` stream.

Instantiate with keyword options or a config::

    MagnitudePruner(sparsity=0.5)
    MagnitudePruner(MagnitudePruner.Config(sparsity=0.5))
    MagnitudePruner({"sparsity": 0.5})
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterable, Sequence

from .config import Config
from .contract import Package, TensorSig, VerifyRules
from .errors import ConfigError

if TYPE_CHECKING:  # heavy imports only for type checkers
    import numpy as np
    import torch

    from .artifact import Artifact
    from .contract import ProfileRow
    from .context import StageContext
    from .graph import Graph
    from .quant import QuantPlan

KINDS = ("distiller", "pruner", "quantizer", "target", "runner", "optimizer")


class Plugin(ABC):
    """Common part of methods, targets and runners."""

    kind: ClassVar[str] = ""
    name: ClassVar[str] = ""
    version: ClassVar[str] = "1.0"
    Config: ClassVar[type[Config]] = Config

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # Tag the config with its owner so a dict form names the method it configures.
        if cls.__dict__.get("name") and "Config" in cls.__dict__:
            cls.Config.type_tag = f"{cls.kind}.{cls.name}"

    def __init__(self, config: Config | dict | None = None, **options: Any) -> None:
        if isinstance(config, dict):
            config = self.Config.from_dict({**config, **options})
        elif config is None:
            try:
                config = self.Config(**options)
            except TypeError as exc:
                raise ConfigError(f"{self.kind} {self.name!r}: {exc}; valid fields: "
                                  + ", ".join(f.name for f in dataclasses.fields(self.Config))) from None
        elif options:
            config = dataclasses.replace(config, **options)
        if not isinstance(config, self.Config):
            raise ConfigError(f"{self.kind} {self.name!r} takes a {self.Config.__qualname__}, "
                              f"got {type(config).__name__}")
        self.config = config

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"


class Method(Plugin):
    """A torch-side compression method (distiller, pruner, quantizer)."""

    #: data streams the method cannot run without (checked before any stage runs)
    streams: ClassVar[tuple[str, ...]] = ()

    def run(self, model: "torch.nn.Module", ctx: "StageContext") -> "torch.nn.Module":
        """Apply the method to ``model`` inside :func:`sdk.compress` (default: ``apply`` on ``train``)."""
        return self.apply(model, ctx.data.get("train"))


class Distiller(Method):
    """Knowledge distillation: a loss between student and teacher, and the
    training loop that minimises it."""

    kind = "distiller"
    #: True when the original model cannot be the teacher (an ensemble): ``teacher=`` is required
    needs_teacher: ClassVar[bool] = False

    def run(self, model, ctx):
        """``apply(student, teacher, train)``; the teacher is the caller's or, when none was
        given, the uncompressed original (``ctx.teacher is None`` tells the two apart)."""
        return self.apply(model, ctx.teacher if ctx.teacher is not None else ctx.original, ctx.data.get("train"))

    @abstractmethod
    def apply(self, student: "torch.nn.Module", teacher: Any, data: Iterable) -> "torch.nn.Module":
        """Train ``student`` (in place) on ``data`` guided by ``teacher``; return it."""


class Pruner(Method):
    """Pruning: removes or zeroes weights, channels or blocks."""

    kind = "pruner"

    @abstractmethod
    def apply(self, model: "torch.nn.Module", data: Iterable | None = None) -> "torch.nn.Module":
        """Prune ``model`` (the caller passes a copy it may modify); return the result."""


class Quantizer(Method):
    """Quantization.  Post-training quantizers (``post_training = True``) act on
    the captured graph at deploy time; training-time ones (QAT, binary, ...)
    rewrite the torch module in :meth:`apply`."""

    kind = "quantizer"
    post_training: ClassVar[bool] = True
    #: False: with no calibration data, deploy calibrates on the example inputs
    requires_calibration: ClassVar[bool] = True

    def calibrate(self, graph: "Graph", batches: Sequence[tuple]) -> "QuantPlan":
        """Observe ``batches`` flowing through ``graph``; return the quantization plan."""
        raise NotImplementedError(f"quantizer {self.name!r} does not calibrate graphs")

    def calibration_data(self, model: "torch.nn.Module", example_inputs: tuple) -> list[tuple] | None:
        """Calibration batches this quantizer makes itself from the (compressed) torch model when the
        caller passes none (``data-free`` synthesises them from BatchNorm statistics); ``None``: it
        makes none."""
        return None

    def refine(self, graph: "Graph", batches: Sequence[tuple], plan: "QuantPlan") -> "QuantPlan":
        """As a later graph-side stage of a recipe: refine the ``plan`` of the stages before
        (default: calibrate, and this stage's specs win where both have one)."""
        return plan.then(self.calibrate(graph, batches))

    def apply(self, model: "torch.nn.Module", data: Iterable | None = None) -> "torch.nn.Module":
        """Rewrite (and train, where the method trains) ``model``; return it."""
        raise NotImplementedError(f"quantizer {self.name!r} does not rewrite torch modules")


class Target(Plugin):
    """A hardware target: lowers a captured graph and writes the packed model."""

    kind = "target"
    #: quantizer applied when the recipe names none (``None``: float target)
    default_quantizer: ClassVar[str | None] = None
    #: runner used by ``art.run`` when none is named
    default_runner: ClassVar[str] = "host"
    #: the weight encodings this target ships natively (:class:`sdk.encoding.Carries`; empty:
    #: float32 weights as torch has them)
    carries: ClassVar[tuple] = ()
    #: quantized activation dtypes it takes from a plan (empty: float activations only)
    activation_dtypes: ClassVar[tuple[str, ...]] = ()
    #: True when every activation needs a quantization spec (integer-only graphs)
    needs_activation_specs: ClassVar[bool] = False
    #: where integer weights may meet activations (:data:`sdk.quant.COMPUTE`): ``static`` (calibrated
    #: integer activations), ``dynamic`` (quantized at run time), ``weight-only`` (dequantized weights)
    computes: ClassVar[tuple[str, ...]] = ("static",)
    #: the device the cost model estimates for (:class:`sdk.cost.DeviceProfile`)
    device: ClassVar[Any] = None

    def default_quantizer_config(self) -> dict:
        """Config of :attr:`default_quantizer` derived from this target's own options."""
        return {}

    def check(self, graph: "Graph") -> None:
        """Raise :class:`sdk.errors.UnsupportedOpError` for the first node this
        target cannot lower.  Called before calibration so bad models fail fast."""

    def check_plan(self, graph: "Graph", plan: "QuantPlan | None") -> list[dict]:
        """Refuse a plan (or torch-side hints) this target cannot ship with
        :class:`sdk.encoding.EncodingError` naming the layer, the encoding and the targets
        that carry it; return the per-weight ``encodings`` rows of the manifest."""
        from .encoding import check_plan

        return check_plan(self, graph, plan, graph.hints)

    def cost(self, graph: "Graph", plan: "QuantPlan | None", encodings: list[dict] | None = None) -> list[dict]:
        """Per-layer cost on :attr:`device` before packing (:func:`sdk.cost.layer_costs`):
        stored weight bytes, MACs/BOPs, estimated latency and energy.  ``encodings``: the
        rows of :meth:`check_plan` when the caller has them already."""
        from .cost import layer_costs
        from .encoding import float_dtype

        if self.device is None:
            return []
        rows = self.check_plan(graph, plan) if encodings is None else encodings
        stored = {r["tensor"]: r["stored_bits"] for r in rows}
        return layer_costs(graph, plan, self.device, float_format=float_dtype(self), stored_bits=stored)

    def prepare(self, graph: "Graph") -> "Graph":
        """Target-specific graph passes before calibration (default: none)."""
        return graph

    @abstractmethod
    def pack(self, graph: "Graph", plan: "QuantPlan | None", calibration: list | None = None) -> Package:
        """Lower ``graph`` with the quantization ``plan`` and return the files.

        ``calibration`` holds the checked calibration batches (``None`` when the
        user gave none), for targets that analyse ranges themselves."""

    def rules_for(self, quantization: dict | None) -> VerifyRules:
        """The pass criteria of one artifact, given its manifest's ``quantization`` entry (the
        plan's method, config and ``compute``); default :meth:`verify_rules`."""
        return self.verify_rules()

    def verify_rules(self) -> VerifyRules:
        """Pass criteria for :meth:`sdk.Artifact.verify`.  Keys (all optional):
        ``max_lsb`` (vs the reference runner), ``min_bit_exact_ratio``,
        ``min_sqnr_db``, ``max_rel_err`` and ``min_top1_agreement`` (vs the
        float model); ``runners``: ``{runner name: rules}`` overriding these
        for one runner."""
        return {}


class Runner(Plugin):
    """Executes artifacts of the targets listed in ``targets``."""

    kind = "runner"
    targets: ClassVar[tuple[str, ...]] = ()
    #: True when outputs are the runtime's own integers (compared in LSB)
    exact: ClassVar[bool] = False

    def unavailable(self) -> str | None:
        """``None`` when this runner can run here, else why not and what to install."""
        return None

    @abstractmethod
    def open(self, artifact: "Artifact") -> Callable[[list["np.ndarray"]], list["np.ndarray"]]:
        """Load ``artifact`` once; return a function from inputs to float outputs."""


class Optimizer(Plugin):
    """An optimizer every training stage can name (``optimizer: <name>``, options in
    ``optimizer_options``).  :meth:`build` receives parameter groups that carry
    the stage's ``lr``."""

    kind = "optimizer"

    @abstractmethod
    def build(self, params: Iterable) -> "torch.optim.Optimizer":
        """A ``torch.optim.Optimizer`` over ``params`` (tensors or param-group dicts)."""
