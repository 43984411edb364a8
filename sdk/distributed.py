"""Data-parallel training across processes with ``torch.distributed``.

The same script runs alone or under ``torchrun``, unchanged::

    python examples/distributed_train.py                          # one process
    torchrun --nproc_per_node=2 examples/distributed_train.py     # two, on this machine
    torchrun --nnodes=2 --node_rank=0 --nproc_per_node=4 \\
             --master_addr=host0 --master_port=29500 script.py    # eight, on two machines

:func:`sdk.trainer.fit` (so every distiller, QAT and pruner fine-tune) is data-parallel
when the run has more than one process: ``torchrun`` set ``WORLD_SIZE`` > 1, or the
caller already ran ``torch.distributed.init_process_group``.  Without a process group
:func:`init` starts one from ``env://`` (``gloo`` for CPU models; ``cpu:gloo,cuda:nccl``
for CUDA ones, each rank on ``cuda:LOCAL_RANK`` unless its model is already on a GPU).

**The global batch.**  What every rank trains on together is exactly what one
process would train on: the same batches, in the same order.

* A plain ``torch.utils.data.DataLoader`` over a map-style dataset (e.g.
  :func:`sdk.trainer.make_loader`) is rebuilt around its own batch sampler
  (:class:`ShardedBatchSampler`): every rank draws the same global batches of
  indices (the loader's generator, or a seed shared by all ranks and changed
  every epoch when it has none) and loads only its slice of each.
* Anything else — a list of ``(x, y)`` batches, a generator, an iterable-style
  or subclassed loader — is read in full on every rank and each batch is split
  (:func:`shard_batch`): every tensor or array of a tuple/list/dict batch is
  cut along its first (sample) dimension.

Rank ``r`` of ``W`` takes rows ``[start_r, start_r + n_r)`` with ``n_r = B // W``
plus one for the first ``B % W`` ranks (:func:`shard_sizes`: 7 over 2 ranks is
4 + 3; 1 over 2 is 1 + 0).  A rank left with no rows runs the batch's last
sample with weight 0 (:class:`LocalBatch`), so every rank runs every forward
pass (collectives inside one, e.g. ``SyncBatchNorm``'s, cannot hang) and that
sample still counts once.

**Gradients.**  After ``backward`` each rank's gradient is weighted by its share
of the batch, ``g = Σ_r (n_r / B) · g_r`` (one ``all_reduce``): for a loss that
is a mean over samples plus sample-independent terms (every SDK loss, recipe
penalties) that is the gradient of the whole batch's loss, also when ``B`` does
not divide evenly.  Parameters (and buffers) start from rank 0's (a broadcast,
as ``DistributedDataParallel`` does), so all ranks take identical steps.  The
model is not wrapped: step functions get the model itself, so ``model(x)``,
``named_modules`` and forward hooks (:mod:`sdk.features`), cohorts held in a
``ModuleList`` (``dml``), closures over a student (``fitnets``), ``params=``
subsets and frozen teachers all work as in one process.  (A
``DistributedDataParallel`` wrapper syncs only gradients of forward passes run
through the wrapper, which those step functions do not do; the price is that
communication starts after ``backward`` instead of overlapping it.)

**Buffers and BatchNorm.**  Every step, each buffer is replaced by the
sample-weighted mean over ranks (accumulated in float64, so a buffer that is the
same everywhere — a pruning mask, a step counter — stays bit-identical): a
BatchNorm ``running_mean`` gets exactly the whole batch's update.  In training
mode BatchNorm still normalises by the statistics of the rank's own slice (a
smaller batch), so a model with BatchNorm trains slightly differently from one
process; ``torch.nn.SyncBatchNorm`` would remove that on GPUs but torch 2.13
refuses it on CPU, so the SDK does not convert layers.  A model without
BatchNorm, or with it in eval mode, reaches the one-process weights up to float
summation order.

**Metrics, seeds, output.**  The losses ``fit`` returns are those of the whole
batch (reduced), the same on every rank; :func:`sdk.trainer.evaluate` shards its
data and reduces its counts.  Both are collective: call them on every rank.
Each rank seeds torch with ``seed + 104729 · rank`` for dropout and
augmentation after the broadcast (rank 0 keeps ``seed``) and with ``seed`` again
when training ends.  Progress bars show on rank 0 only.  :func:`sdk.deploy`
writes the artifact on rank 0 only (:func:`on_main`); the other ranks wait and
open what it wrote.  Models outside the trained one (a teacher) must be the
same on every rank: load them from one checkpoint.  Inside
:func:`local_training` ``fit`` and ``evaluate`` ignore the other ranks (data
already split by the caller).

**State outside buffers.**  What a training stage keeps in Python attributes
instead of buffers is not reduced.  An observer that tracks activation ranges
that way must reduce its batch range itself with :func:`all_reduce_range` to
see the whole batch: ``qat``'s (:class:`sdk.fakequant.RangeTracker`) does.

>>> shard_sizes(7, 2), shard_sizes(1, 2)
([4, 3], [1, 0])
>>> import torch
>>> x, y = shard_batch((torch.arange(5.0), torch.arange(5)), rank=1, world=2)
>>> x.tolist(), y.tolist()
([3.0, 4.0], [3, 4])
"""

from __future__ import annotations

import atexit
import contextlib
import contextvars
import dataclasses
import os
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch

from .errors import ArtifactError, EdgepackError, InputError

__all__ = ["world_size", "rank", "is_main", "init", "data_parallel", "local_training", "barrier", "on_main",
           "open_from_main", "shard_sizes", "shard_batch",
           "batch_rows", "LocalBatch", "local_batch", "ShardedBatchSampler", "shard", "rank_seed", "Synchroniser", "all_reduce_sum",
           "all_reduce_range"]

#: bytes per all_reduce bucket of gradients
_BUCKET_BYTES = 32 << 20
#: multiplier between the seeds of consecutive ranks (a prime, so seeds of nearby configs rarely collide)
_RANK_SEED_STRIDE = 104729


# -- who am I --------------------------------------------------------------------------------

def _dist_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise InputError(f"environment variable {name}={value!r} must be an integer (torchrun sets it)") from None


def world_size() -> int:
    """The number of processes training together: the process group's size, else ``WORLD_SIZE``, else 1."""
    if _dist_ready():
        return torch.distributed.get_world_size()
    return max(_env_int("WORLD_SIZE", 1), 1)


def rank() -> int:
    """This process's rank (0 … world_size − 1): the process group's, else ``RANK``, else 0."""
    if _dist_ready():
        return torch.distributed.get_rank()
    return _env_int("RANK", 0) if world_size() > 1 else 0


def is_main() -> bool:
    """Whether this is rank 0 (always true for a single process): the one that logs and writes."""
    return rank() == 0


def init(device: torch.device | str | None = None) -> bool:
    """Join the run's process group, starting it from ``env://`` when ``torchrun`` launched
    several processes and nobody did yet; returns whether there is more than one process.

    ``device`` (where the model lives) picks the backend: ``gloo`` for CPU, ``cpu:gloo,cuda:nccl``
    for CUDA.  Raises :class:`InputError` when ``WORLD_SIZE`` says several processes but the
    rendezvous variables torchrun sets are missing.

    >>> init() if "WORLD_SIZE" not in os.environ else False    # one plain process: nothing to join
    False
    """
    if _dist_ready():
        return torch.distributed.get_world_size() > 1
    if world_size() <= 1:
        return False
    if not torch.distributed.is_available():
        raise InputError(f"WORLD_SIZE={world_size()} asks for distributed training, but this torch build has no "
                         "torch.distributed; run one process or install a torch with distributed support")
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
    if missing:
        raise InputError(f"WORLD_SIZE={world_size()} says this is one of several processes, but "
                         f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set; launch with "
                         "`torchrun --nproc_per_node=N script.py` (it sets them) or unset WORLD_SIZE")
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        if not (torch.cuda.is_available() and torch.distributed.is_nccl_available()):
            raise InputError("the model is on CUDA but CUDA or NCCL is unavailable in this process; "
                             "move the model to the CPU (gloo) or fix the CUDA install")
        torch.cuda.set_device(device.index if device.index is not None else _env_int("LOCAL_RANK", 0))
        backend = "cpu:gloo,cuda:nccl"
    else:
        backend = "gloo"
    torch.distributed.init_process_group(backend, init_method="env://")
    atexit.register(_destroy)
    return True


#: set inside :func:`local_training`: fit/evaluate train on this rank's data alone
_local: contextvars.ContextVar[bool] = contextvars.ContextVar("edgepack_local_training", default=False)


@contextlib.contextmanager
def local_training():
    """Within the block :func:`sdk.trainer.fit` and :func:`~sdk.trainer.evaluate` ignore the other
    ranks (for data a caller already split by rank, or one rank's own experiment).

    >>> with local_training():
    ...     data_parallel()
    False
    """
    token = _local.set(True)
    try:
        yield
    finally:
        _local.reset(token)


def data_parallel(device: torch.device | str | None = None) -> bool:
    """Whether :func:`sdk.trainer.fit` / ``evaluate`` run data-parallel now: several processes
    (:func:`init`, which joins the group) and not inside :func:`local_training`."""
    return not _local.get() and init(device)


def _destroy() -> None:
    if _dist_ready():
        torch.distributed.destroy_process_group()


def _comm_device(t: torch.Tensor) -> torch.device:
    """Where a collective on ``t`` must run: NCCL-only groups take CUDA tensors, gloo-only groups CPU ones."""
    backend = str(torch.distributed.get_backend()).lower()
    if "nccl" in backend and "gloo" not in backend:
        return torch.device("cuda", torch.cuda.current_device())
    if "nccl" not in backend:
        return torch.device("cpu")
    return t.device


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """``t`` summed over ranks (a new tensor on ``t``'s device; ``t`` itself with one process)."""
    if not init(t.device):
        return t
    buf = t.to(_comm_device(t), copy=True)
    torch.distributed.all_reduce(buf, op=torch.distributed.ReduceOp.SUM)
    return buf.to(t.device)


def all_reduce_range(lo: float, hi: float) -> tuple[float, float]:
    """``(min of lo, max of hi)`` over ranks: the whole batch's range from each rank's slice
    (for observers that track activation ranges in the forward pass; every rank runs every
    forward pass, so calling it there cannot hang).

    >>> all_reduce_range(-1.0, 2.0)
    (-1.0, 2.0)
    """
    if not data_parallel():          # one process, or local_training: the ranks run different forward passes
        return float(lo), float(hi)
    t = torch.tensor([float(lo), -float(hi)], dtype=torch.float64)
    buf = t.to(_comm_device(t))
    torch.distributed.all_reduce(buf, op=torch.distributed.ReduceOp.MIN)
    lo, neg_hi = buf.cpu().tolist()
    return lo, -neg_hi


def barrier() -> None:
    """Wait until every rank got here (nothing with one process)."""
    if init():
        torch.distributed.barrier()


def on_main(fn: Callable[[], Any]) -> Any:
    """``fn()`` on rank 0 only; every rank returns its result (it must pickle).

    The other ranks wait for it.  When ``fn`` raises on rank 0 they raise too: the
    same :mod:`sdk.errors` class when it takes a plain message, else
    :class:`~sdk.errors.EdgepackError`, saying that rank 0 failed — so no rank hangs.
    With one process it is just ``fn()``.

    >>> on_main(lambda: 42)
    42
    """
    if not init():
        return fn()
    box: list[Any] = [None]
    if is_main():
        try:
            result = fn()
        except BaseException as exc:
            box[0] = ("error", type(exc).__name__, str(exc))
            torch.distributed.broadcast_object_list(box, src=0)
            raise
        box[0] = ("ok", result)
    torch.distributed.broadcast_object_list(box, src=0)
    if box[0][0] == "ok":
        return box[0][1]
    _, name, message = box[0]
    from . import errors

    message = f"rank 0 failed ({name}): {message}"
    cls = getattr(errors, name, None)
    if isinstance(cls, type) and issubclass(cls, EdgepackError):
        try:
            raise cls(message)
        except TypeError:          # its constructor wants more than a message
            pass
    raise EdgepackError(message)


def open_from_main(path) -> Any:
    """What a rank other than 0 returns for the artifact rank 0 wrote at ``path``
    (:func:`sdk.artifact.load`); :class:`ArtifactError` when this machine cannot see it."""
    from pathlib import Path

    from .artifact import load

    if not Path(path).exists():
        raise ArtifactError(f"rank 0 wrote the artifact to {path}, which rank {rank()} cannot see (another machine "
                            "without shared storage); use the artifact on rank 0 (sdk.distributed.is_main()) or "
                            "write output= to a shared file system")
    return load(path)


# -- sharding --------------------------------------------------------------------------------

def shard_sizes(n: int, world: int) -> list[int]:
    """How many of ``n`` samples each of ``world`` ranks takes: ``n // world``, one more for
    the first ``n % world`` ranks (so ranks may get 0 when ``n < world``)."""
    if world < 1:
        raise InputError(f"world size must be at least 1, got {world}")
    base, extra = divmod(int(n), world)
    return [base + (1 if r < extra else 0) for r in range(world)]


def _slice_of(n: int, rank: int, world: int) -> slice:
    if not 0 <= rank < world:
        raise InputError(f"rank {rank} is outside 0..{world - 1}")
    sizes = shard_sizes(n, world)
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def _is_array(x: Any) -> bool:
    return isinstance(x, (torch.Tensor, np.ndarray)) and x.ndim >= 1


def batch_rows(batch: Any) -> int:
    """The number of samples in ``batch``: the first dimension of its first tensor or array
    (searching tuples, lists and dicts).

    >>> batch_rows({"x": torch.zeros(3, 2), "y": torch.zeros(3)})
    3
    """
    found = _first_array(batch)
    if found is None:
        raise InputError(f"a training batch holds no tensor or array with a sample dimension (got "
                         f"{type(batch).__name__}); distributed training splits batches along their first "
                         "dimension: pass tensors, or tuples/lists/dicts of them")
    return int(found.shape[0])


def _first_array(batch: Any):
    if _is_array(batch):
        return batch
    items = batch.values() if isinstance(batch, dict) else batch if isinstance(batch, (tuple, list)) else ()
    for item in items:
        found = _first_array(item)
        if found is not None:
            return found
    return None


def shard_batch(batch: Any, rank: int, world: int) -> Any:
    """Rank ``rank``'s part of ``batch``: every tensor/array (inside tuples, lists, dicts,
    namedtuples) cut to the rows :func:`shard_sizes` gives this rank; scalars, 0-d
    tensors and other values are kept whole.  Raises :class:`InputError` when the
    tensors disagree on the number of samples or there is none.

    >>> shard_batch({"x": torch.arange(3), "t": 1.5}, rank=0, world=2)
    {'x': tensor([0, 1]), 't': 1.5}
    """
    n = batch_rows(batch)
    rows = _slice_of(n, rank, world)

    def cut(x: Any) -> Any:
        if _is_array(x):
            if x.shape[0] != n:
                raise InputError(f"a batch holds tensors with {n} and {x.shape[0]} rows; distributed training "
                                 "splits every tensor of a batch along its first (sample) dimension, so they must "
                                 "agree (keep per-batch constants as Python numbers or 0-d tensors)")
            return x[rows]
        if isinstance(x, dict):
            return type(x)((k, cut(v)) for k, v in x.items())
        if isinstance(x, tuple) and hasattr(x, "_fields"):
            return type(x)(*(cut(v) for v in x))
        if isinstance(x, (tuple, list)):
            return type(x)(cut(v) for v in x)
        return x

    return cut(batch)


@dataclasses.dataclass
class LocalBatch:
    """What one rank trains on: ``batch``, its slice, and ``rows``, how many samples of the
    global batch that is (the weight of its loss and gradient).  ``rows == 0``: the global
    batch had fewer samples than ranks, and ``batch`` is its last sample, run only so that
    this rank takes part in the step."""

    batch: Any
    rows: int


def local_batch(batch: Any, rank: int, world: int) -> LocalBatch:
    """Rank ``rank``'s :class:`LocalBatch` of ``batch`` (:func:`shard_batch`; the last sample with
    weight 0 when its slice is empty).

    >>> local_batch(torch.arange(3), rank=1, world=4)
    LocalBatch(batch=tensor([1]), rows=1)
    >>> local_batch(torch.arange(3), rank=3, world=4)
    LocalBatch(batch=tensor([2]), rows=0)
    """
    n = batch_rows(batch)
    rows = shard_sizes(n, world)[rank]
    if rows == 0 and n > 0:
        return LocalBatch(shard_batch(batch, n - 1, n), 0)      # with n ranks, rank n - 1 holds the last row
    return LocalBatch(shard_batch(batch, rank, world), rows)


class Pad(int):
    """An index a :class:`ShardedBatchSampler` adds for a rank whose slice is empty (weight 0)."""


class _PadSample:
    def __init__(self, sample: Any):
        self.sample = sample


class _Tagged(torch.utils.data.Dataset):
    """``dataset`` whose samples fetched through a :class:`Pad` index are marked as padding."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index):
        sample = self.dataset[int(index)]
        return _PadSample(sample) if isinstance(index, Pad) else sample


class _Collate:
    """The loader's ``collate_fn`` around a :class:`LocalBatch` (picklable for workers)."""

    def __init__(self, collate_fn: Callable):
        self.collate_fn = collate_fn

    def __call__(self, samples):
        pads = sum(isinstance(s, _PadSample) for s in samples)
        samples = [s.sample if isinstance(s, _PadSample) else s for s in samples]
        return LocalBatch(self.collate_fn(samples), len(samples) - pads)


class ShardedBatchSampler:
    """This rank's slice of every batch of indices ``batch_sampler`` yields (an empty slice
    becomes the batch's last index as a :class:`Pad`).

    Every rank draws the same epoch of global batches: the wrapped sampler's own
    generator decides the order when it has one; otherwise torch's global RNG, reseeded
    (inside ``torch.random.fork_rng``, so the rank's own stream is untouched) with
    ``seed`` plus the epoch count — the same on every rank, new each epoch.

    >>> s = ShardedBatchSampler([[0, 1, 2], [3, 4]], rank=1, world=2)
    >>> list(s), len(s)
    ([[2], [4]], 2)
    >>> list(ShardedBatchSampler([[0, 1, 2], [3]], rank=1, world=2))
    [[2], [3]]
    """

    def __init__(self, batch_sampler: Iterable[Sequence[int]], rank: int, world: int, seed: int = 0):
        _slice_of(0, rank, world)
        self.batch_sampler, self.rank, self.world, self.seed = batch_sampler, rank, world, seed
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self) -> Iterator[list[int]]:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed + self.epoch)
            batches = [list(b) for b in self.batch_sampler]
        self.epoch += 1
        for b in batches:
            part = b[_slice_of(len(b), self.rank, self.world)]
            yield part if part or not b else [Pad(b[-1])]


class _SplitBatches:
    """Every batch of ``data`` cut to one rank's rows (re-iterable when ``data`` is)."""

    def __init__(self, data: Iterable, rank: int, world: int):
        self.data, self.rank, self.world = data, rank, world

    def __len__(self) -> int:
        return len(self.data)

    def __iter__(self) -> Iterator[LocalBatch]:
        for batch in self.data:
            yield local_batch(batch, self.rank, self.world)


def shard(data: Iterable, rank: int, world: int, seed: int = 0) -> Iterable[LocalBatch]:
    """``data`` as rank ``rank`` of ``world`` sees it (see the module docstring), one
    :class:`LocalBatch` per global batch: a plain ``DataLoader`` over a map-style dataset is
    rebuilt on a :class:`ShardedBatchSampler` (each rank loads its own samples only);
    anything else has each batch split by :func:`local_batch`.

    >>> [b.rows for b in shard([torch.zeros(3, 2), torch.zeros(1, 2)], rank=1, world=2)]
    [1, 0]
    """
    from torch.utils.data import DataLoader, IterableDataset

    if type(data) is DataLoader and data.batch_sampler is not None \
            and not isinstance(data.dataset, IterableDataset):
        options = dict(num_workers=data.num_workers, pin_memory=data.pin_memory, timeout=data.timeout,
                       worker_init_fn=data.worker_init_fn, generator=data.generator,
                       multiprocessing_context=data.multiprocessing_context,
                       persistent_workers=data.persistent_workers)
        for name in ("pin_memory_device",):
            if hasattr(data, name):
                options[name] = getattr(data, name)
        if data.num_workers > 0:
            options["prefetch_factor"] = data.prefetch_factor
        options["in_order"] = True        # LocalBatch weights follow the sampler's order
        return DataLoader(_Tagged(data.dataset),
                          batch_sampler=ShardedBatchSampler(data.batch_sampler, rank, world, seed),
                          collate_fn=_Collate(data.collate_fn), **options)
    return _SplitBatches(data, rank, world)


def rank_seed(seed: int, rank: int) -> int:
    """The seed rank ``rank`` trains with (dropout, augmentation): ``seed`` on rank 0."""
    return seed + _RANK_SEED_STRIDE * rank


# -- keeping ranks in step -------------------------------------------------------------------

def _unique(tensors: Iterable[torch.Tensor]) -> list[torch.Tensor]:
    seen, out = set(), []
    for t in tensors:
        if id(t) not in seen:
            seen.add(id(t))
            out.append(t)
    return out


def _buckets(tensors: Sequence[torch.Tensor]) -> Iterator[list[torch.Tensor]]:
    """Runs of ``tensors`` of one dtype and device, at most :data:`_BUCKET_BYTES` each (or one tensor)."""
    bucket: list[torch.Tensor] = []
    size = 0
    for t in tensors:
        nbytes = t.numel() * t.element_size()
        if bucket and (t.dtype != bucket[0].dtype or t.device != bucket[0].device or size + nbytes > _BUCKET_BYTES):
            yield bucket
            bucket, size = [], 0
        bucket.append(t)
        size += nbytes
    if bucket:
        yield bucket


def _flat(tensors: Sequence[torch.Tensor], device: torch.device) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1).to(device) for t in tensors])


def _unflat_into(flat: torch.Tensor, tensors: Sequence[torch.Tensor]) -> None:
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset:offset + n].view_as(t))
        offset += n


def broadcast_(tensors: Iterable[torch.Tensor], src: int = 0) -> None:
    """Overwrite ``tensors`` in place with rank ``src``'s values (bucketed)."""
    tensors = sorted(_unique(tensors), key=lambda t: (str(t.device), str(t.dtype)))
    with torch.no_grad():
        for bucket in _buckets(tensors):
            flat = _flat(bucket, _comm_device(bucket[0]))
            torch.distributed.broadcast(flat, src=src)
            _unflat_into(flat, bucket)


class Synchroniser:
    """Keeps the ranks of one :func:`sdk.trainer.fit` in step.

    Built after the optimizer: broadcasts rank 0's parameters and buffers of
    ``model`` (and any optimizer parameter outside it).  After each ``backward``,
    :meth:`reduce` turns every rank's gradients and buffers into the sample-weighted
    means over ranks and returns the whole batch's loss.
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        self.params = _unique(p for group in optimizer.param_groups for p in group["params"])
        self.buffers = [b for b in _unique(model.buffers()) if not b.dtype.is_complex]
        broadcast_([*model.parameters(), *self.params, *self.buffers])
        self.device = _comm_device(self.params[0] if self.params else torch.zeros(()))

    def reduce(self, loss: torch.Tensor, rows: int) -> float:
        """All-reduce after this rank's ``backward`` of ``loss`` on ``rows`` samples of the
        global batch (0: a padding sample, weight 0).  Returns the global batch's loss (NaN when any rank's
        was not finite: every rank then sees it); gradients and buffers hold the weighted
        means afterwards unless that loss was not finite."""
        with torch.no_grad():
            present = [p.grad is not None for p in self.params]
            head = torch.tensor([float(rows), float(loss.detach()) * rows, *present],
                                dtype=torch.float64)
            parts = [head] + [b.detach().reshape(-1).to("cpu", torch.float64) * rows for b in self.buffers]
            stats = torch.cat(parts).to(self.device)
            torch.distributed.all_reduce(stats)
            stats = stats.cpu()
            total = float(stats[0])
            if total == 0:
                raise InputError("a training batch has no samples on any rank; remove empty batches from the data")
            value = float(stats[1]) / total
            if not np.isfinite(value):
                return value
            offset = 2 + len(self.params)
            for b in self.buffers:
                n = b.numel()
                mean = stats[offset:offset + n] / total
                if not b.dtype.is_floating_point:
                    mean = mean.round()
                b.copy_(mean.view_as(b).to(b.device, b.dtype))
                offset += n
            grads = []
            for p, anywhere in zip(self.params, stats[2:2 + len(self.params)].tolist()):
                if not anywhere:
                    continue
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                grads.append(p.grad)
            for bucket in _buckets(sorted(grads, key=lambda g: (str(g.device), str(g.dtype)))):
                flat = _flat(bucket, _comm_device(bucket[0])) * rows
                torch.distributed.all_reduce(flat)
                _unflat_into(flat / total, bucket)
        return value
