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
=============  ==============================================================

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
from .errors import ConfigError

if TYPE_CHECKING:  # heavy imports only for type checkers
    import numpy as np
    import torch

    from .artifact import Artifact
    from .graph import Graph
    from .quant import QuantPlan

KINDS = ("distiller", "pruner", "quantizer", "target", "runner")


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


class Distiller(Plugin):
    """Knowledge distillation: a loss between student and teacher, and the
    training loop that minimises it."""

    kind = "distiller"

    @abstractmethod
    def apply(self, student: "torch.nn.Module", teacher: Any, data: Iterable) -> "torch.nn.Module":
        """Train ``student`` (in place) on ``data`` guided by ``teacher``; return it."""


class Pruner(Plugin):
    """Pruning: removes or zeroes weights, channels or blocks."""

    kind = "pruner"

    @abstractmethod
    def apply(self, model: "torch.nn.Module", data: Iterable | None = None) -> "torch.nn.Module":
        """Prune ``model`` (the caller passes a copy it may modify); return the result."""


class Quantizer(Plugin):
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

    def apply(self, model: "torch.nn.Module", data: Iterable | None = None) -> "torch.nn.Module":
        """Rewrite (and train, where the method trains) ``model``; return it."""
        raise NotImplementedError(f"quantizer {self.name!r} does not rewrite torch modules")


@dataclasses.dataclass
class TensorSig:
    """One model input or output as the artifact sees it."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    quantization: dict | None = None  # {"scale": [...], "zero_point": [...], "axis": int|None}
    layout: tuple[int, ...] | None = None   # stored dim i holds torch dim layout[i] (NHWC: 0, 2, 3, 1)
    stored_dtype: str | None = None         # dtype inside the packed model, when not ``dtype``

    def to_dict(self) -> dict:
        d = {"name": self.name, "shape": list(self.shape), "dtype": self.dtype, "quantization": self.quantization}
        if self.layout is not None:
            d["layout"] = list(self.layout)
        if self.stored_dtype is not None:
            d["stored_dtype"] = self.stored_dtype
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TensorSig":
        layout = d.get("layout")
        return cls(d["name"], tuple(d["shape"]), d["dtype"], d.get("quantization"),
                   tuple(layout) if layout is not None else None, d.get("stored_dtype"))


@dataclasses.dataclass
class Package:
    """What a target's :meth:`Target.pack` returns: the files of the artifact
    and what the manifest should say about them."""

    files: dict[str, bytes]
    inputs: list[TensorSig]
    outputs: list[TensorSig]
    layers: list[dict]                       # per-layer profile rows
    extra: dict = dataclasses.field(default_factory=dict)  # target-specific manifest entries


class Target(Plugin):
    """A hardware target: lowers a captured graph and writes the packed model."""

    kind = "target"
    #: quantizer applied when the recipe names none (``None``: float target)
    default_quantizer: ClassVar[str | None] = None
    #: runner used by ``art.run`` when none is named
    default_runner: ClassVar[str] = "host"

    def default_quantizer_config(self) -> dict:
        """Config of :attr:`default_quantizer` derived from this target's own options."""
        return {}

    def check(self, graph: "Graph") -> None:
        """Raise :class:`sdk.errors.UnsupportedOpError` for the first node this
        target cannot lower.  Called before calibration so bad models fail fast."""

    def prepare(self, graph: "Graph") -> "Graph":
        """Target-specific graph passes before calibration (default: none)."""
        return graph

    @abstractmethod
    def pack(self, graph: "Graph", plan: "QuantPlan | None", calibration: list | None = None) -> Package:
        """Lower ``graph`` with the quantization ``plan`` and return the files.

        ``calibration`` holds the checked calibration batches (``None`` when the
        user gave none), for targets that analyse ranges themselves."""

    def verify_rules(self) -> dict:
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
