"""A small, deterministic training loop shared by distillation, QAT and
fine-tuning after pruning.

>>> import torch
>>> from sdk.trainer import TrainConfig, fit
>>> net = torch.nn.Linear(2, 1)
>>> data = [(torch.randn(8, 2), torch.randn(8, 1)) for _ in range(4)]
>>> losses = fit(net, data, lambda m, b: torch.nn.functional.mse_loss(m(b[0]), b[1]),
...              TrainConfig(epochs=2, progress=False))
>>> len(losses)
2

Under ``torchrun`` (``WORLD_SIZE`` > 1) or an initialised ``torch.distributed``
process group, :func:`fit` and :func:`evaluate` are data-parallel: each rank
takes its slice of every batch, gradients and metrics are reduced across ranks,
and the result equals one process on the same data.  :mod:`sdk.distributed`
says how the data is split and what differs (BatchNorm's per-rank statistics).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import math
from typing import Any, Callable, ClassVar, Iterable

import torch

from . import distributed
from .config import Config, _plain, check_range
from .errors import ConfigError, InputError
from .log import progress as progress_bar


@dataclasses.dataclass(frozen=True)
class TrainConfig(Config):
    """The training fields every training stage shares; a stage's ``Config`` derives from it
    (and may change the defaults).  Validated when the recipe is read: ``optimizer``
    must be a registered optimizer (``register_optimizers``) and ``optimizer_options``
    valid fields of its ``Config``.

    >>> TrainConfig(optimizer="sgd", optimizer_options={"momentum": 0.5}).optimizer_config().momentum
    0.5
    """

    #: fewest epochs the stage takes (0: its training may be skipped)
    min_epochs: ClassVar[int] = 1

    epochs: int = 1
    lr: float = 1e-3
    optimizer: str = "adam"
    optimizer_options: dict = dataclasses.field(default_factory=dict, hash=False)
    seed: int = 0
    max_steps: int | None = None      # stop after this many optimizer steps
    progress: bool = True

    def __post_init__(self):
        owner = self.type_tag
        check_range(owner, "epochs", self.epochs, self.min_epochs)
        check_range(owner, "lr", self.lr, 0.0, lo_open=True)
        if self.max_steps is not None:
            check_range(owner, "max_steps", self.max_steps, 1)
        if not isinstance(self.optimizer_options, dict):
            raise ConfigError(f"{owner}: optimizer_options must be a mapping of the optimizer's options, "
                              f"got {type(self.optimizer_options).__name__}")
        # the dict form (lists for tuples), so that from_dict(to_dict()) == self
        object.__setattr__(self, "optimizer_options", _plain(self.optimizer_options))
        self.optimizer_config()

    def optimizer_config(self) -> Config:
        """The named optimizer's validated ``Config`` (:class:`ConfigError` / :class:`UnknownPluginError`)."""
        from . import plugins
        from .errors import UnknownPluginError

        if not isinstance(self.optimizer, str):
            raise ConfigError(f"{self.type_tag}: optimizer must be a registered optimizer name, got {self.optimizer!r}")
        try:
            cls = plugins.get("optimizer", self.optimizer)
        except UnknownPluginError as exc:
            raise ConfigError(f"{self.type_tag}: optimizer={self.optimizer!r} is not registered; valid: "
                              f"{', '.join(exc.valid)}") from None
        try:
            return cls.Config.from_dict(self.optimizer_options)
        except (TypeError, ConfigError) as exc:
            raise ConfigError(f"{self.type_tag}: optimizer_options for {self.optimizer!r}: {exc}") from None

    def training(self, **changes: Any) -> "TrainConfig":
        """The shared training fields of this (stage) config as a plain :class:`TrainConfig`."""
        base = {f.name: getattr(self, f.name) for f in dataclasses.fields(TrainConfig)}
        return TrainConfig(**{**base, **changes})


TrainConfig.type_tag = "train"


def make_optimizer(params: Iterable[torch.nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """The registered optimizer ``cfg.optimizer`` over the trainable ``params`` at ``cfg.lr``."""
    from . import plugins

    params = [p for p in params if p.requires_grad]
    optimizer = plugins.get("optimizer", cfg.optimizer)(cfg.optimizer_config())
    return optimizer.build([{"params": params, "lr": cfg.lr}])


#: penalties and callbacks that earlier stages of the running recipe attached (see sdk.context)
_extras: contextvars.ContextVar[tuple[list, list]] = contextvars.ContextVar("edgepack_training_extras",
                                                                           default=([], []))


@contextlib.contextmanager
def training_extras(penalties: list, callbacks: list):
    """Within the block, :func:`fit` adds ``penalty(model)`` to every loss and calls
    ``callback(model, step)`` after every step (how one recipe stage shapes the next's training)."""
    token = _extras.set((penalties, callbacks))
    try:
        yield
    finally:
        _extras.reset(token)


def fit(model: torch.nn.Module, data: Iterable, loss_fn: Callable[[torch.nn.Module, Any], torch.Tensor],
        cfg: TrainConfig | None = None, *, params: Iterable[torch.nn.Parameter] | None = None,
        after_step: Callable[[], None] | None = None, desc: str = "training",
        subject: torch.nn.Module | None = None) -> list[float]:
    """Minimise ``loss_fn(model, batch)`` over ``data`` for ``cfg.epochs``.

    ``data`` must be re-iterable (a list, a DataLoader).  Seeds torch with
    ``cfg.seed`` first, so two runs on the same data give the same weights.
    Returns the mean loss of each epoch.  Raises :class:`InputError` when the
    loss becomes NaN.  Penalties and callbacks of earlier recipe stages see
    ``subject`` (default ``model``): the network being compressed when ``model``
    also holds peers or adapters.

    With several processes (:mod:`sdk.distributed`) every rank must call it with
    the same model, data and config: each trains on its slice of every batch,
    ``loss_fn`` gets ``model`` itself (not a wrapper), and the returned losses are
    the whole batches' — the same on every rank.
    """
    cfg = cfg or TrainConfig()
    if data is None:
        raise InputError(f"{desc} needs data: pass data= (a list of (x, y) batches or a DataLoader)")
    if not hasattr(data, "__len__"):
        data = list(data)
    if len(data) == 0:
        raise InputError(f"{desc} data is empty")
    torch.manual_seed(cfg.seed)
    opt = make_optimizer(model.parameters() if params is None else params, cfg)
    sync = None
    if distributed.data_parallel(_device_of(model)):
        rank, world = distributed.rank(), distributed.world_size()
        data = distributed.shard(data, rank, world, cfg.seed)
        sync = distributed.Synchroniser(model, opt)        # every rank starts from rank 0's weights
        torch.manual_seed(distributed.rank_seed(cfg.seed, rank))
    penalties, callbacks = _extras.get()
    subject = model if subject is None else subject
    model.train()
    history, step = [], 0
    total = cfg.epochs * len(data) if cfg.max_steps is None else min(cfg.max_steps, cfg.epochs * len(data))
    show = cfg.progress and distributed.is_main()
    with progress_bar(total=total, desc=desc, unit="step", enabled=show) as bar:
        for _ in range(cfg.epochs):
            running, count = 0.0, 0
            for batch in data:
                opt.zero_grad(set_to_none=True)
                if sync is not None:
                    batch, rows = batch.batch, batch.rows      # a distributed.LocalBatch
                loss = loss_fn(model, batch)
                for penalty in penalties:
                    loss = loss + penalty(subject)
                if sync is None and not torch.isfinite(loss):
                    raise InputError(f"{desc}: loss became {loss.item()} at step {step}; lower lr or check data")
                loss.backward()
                value = float(loss.detach()) if sync is None else sync.reduce(loss, rows)
                if not math.isfinite(value):
                    raise InputError(f"{desc}: loss became {value} at step {step} (on some rank); "
                                     "lower lr or check data")
                opt.step()
                if after_step is not None:
                    after_step()
                for callback in callbacks:
                    callback(subject, step)
                running += value
                count += 1
                step += 1
                bar.update(1)
                bar.set_postfix(loss=f"{running / count:.4f}")
                if cfg.max_steps is not None and step >= cfg.max_steps:
                    break
            history.append(running / max(count, 1))
            if cfg.max_steps is not None and step >= cfg.max_steps:
                break
    if sync is not None:
        torch.manual_seed(cfg.seed)       # the ranks' streams agree again for what runs next
    model.eval()
    return history


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(iter(model.parameters()), torch.zeros(())).device


def split_batch(batch: Any) -> tuple[Any, Any]:
    """``(inputs, target)`` from a batch: ``(x, y)``, ``[x, y]`` or ``x`` alone (target ``None``)."""
    if isinstance(batch, (tuple, list)):
        return batch[0], (batch[1] if len(batch) > 1 else None)
    return batch, None


def classification_loss(model: torch.nn.Module, batch: Any, *, who: str = "training",
                        hint: str = "") -> torch.Tensor:
    """Cross-entropy of ``model(x)`` against ``y`` for an ``(x, y)`` batch.

    Batches without labels raise :class:`InputError` naming ``who`` needs them
    (and ``hint``, another way out, when there is one).
    """
    x, y = split_batch(batch)
    if y is None:
        raise InputError(f"{who} needs labelled data: pass (x, y) batches as data=" + (f" ({hint})" if hint else ""))
    return torch.nn.functional.cross_entropy(model(x), y)


def finetune(model: torch.nn.Module, data: Any, cfg: TrainConfig, *, desc: str = "fine-tune",
             penalty: Callable[[], torch.Tensor] | None = None) -> list[float]:
    """Cross-entropy training on ``(x, y)`` batches with the training fields of ``cfg``, plus
    ``penalty()`` when given (pruners' fine-tuning and sparsity training)."""
    if data is None:
        raise InputError(f"{desc} needs labelled data: pass data= as (x, y) batches")

    def step(m: torch.nn.Module, batch: Any) -> torch.Tensor:
        loss = classification_loss(m, batch, who=desc)
        return loss + penalty() if penalty is not None else loss

    return fit(model, data, step, cfg, desc=desc)


def finetune_after(model: torch.nn.Module, data: Any, cfg: TrainConfig, *, desc: str) -> list[float]:
    """The cross-entropy fine-tune a stage runs after its own work: ``cfg.finetune_epochs``
    epochs (none when 0) at ``cfg.finetune_lr``, or ``cfg.lr`` when that is ``None``, with the
    other training fields of ``cfg``; the epoch losses."""
    if not cfg.finetune_epochs:
        return []
    return finetune(model, data, cfg.training(epochs=cfg.finetune_epochs, lr=cfg.finetune_lr or cfg.lr), desc=desc)


def make_loader(x: Any, y: Any = None, *, batch_size: int = 64, shuffle: bool = True, seed: int = 0):
    """A seeded ``DataLoader`` over arrays/tensors ``x`` (and labels ``y``)."""
    x = torch.as_tensor(x, dtype=torch.float32)
    tensors = [x] if y is None else [x, torch.as_tensor(y, dtype=torch.long)]
    ds = torch.utils.data.TensorDataset(*tensors)
    gen = torch.Generator().manual_seed(seed)
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=gen)


def evaluate(model: torch.nn.Module, data: Iterable) -> float:
    """Top-1 accuracy of ``model`` on ``(x, y)`` batches.

    With several processes each rank scores its slice of the data and the counts are
    summed over ranks (call it on every rank; all return the same accuracy).

    >>> evaluate(torch.nn.Identity(), [(torch.eye(3), torch.tensor([0, 1, 0]))])
    0.6666666666666666
    """
    model.eval()
    parallel = distributed.data_parallel(_device_of(model))
    if parallel:
        data = distributed.shard(data, distributed.rank(), distributed.world_size())
    right = total = 0
    with torch.no_grad():
        for batch in data:
            weight = 1
            if parallel:        # a padding sample (rows 0) still runs, in step with the other ranks
                batch, weight = batch.batch, min(batch.rows, 1)
            x, y = split_batch(batch)
            right += weight * int((model(x).argmax(-1) == y).sum())
            total += weight * int(y.numel())
    if parallel:
        right, total = (int(v) for v in distributed.all_reduce_sum(torch.tensor([right, total], dtype=torch.float64)))
    return right / total if total else math.nan
