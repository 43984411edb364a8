"""retrieval: the loss is the numpy listwise KL (+ InfoNCE); batches pair each query with its own
candidates; a dual encoder distilled from a joint pair scorer retrieves digits a little better
than the same encoder trained contrastively (same epochs, same seeds); its tower deploys to arm-int8
and the artifact's embeddings retrieve what torch's do; usable from YAML; bad input is named."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

import sdk
from distill_helpers import check_training_config, digit_teachers, np_log_softmax
from plugins.distill.retrieval import Retrieval, retrieval_loss
from sdk.errors import ConfigError, InputError
from sdk.recipe import Recipe

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: one thread is faster

SEEDS = (0, 1, 2)
EPOCHS = 3
DISTILLED = dict(kd_weight=1.0, contrastive_weight=0.0, candidates=32)


# -- numpy references -------------------------------------------------------------


def np_softmax(z):
    return np.exp(np_log_softmax(z))


def np_retrieval_loss(s, t, pos, temperature, kd_weight, contrastive_weight):
    """kd_weight · T² · mean_q KL(softmax(t/T) ‖ softmax(s/T))
    + contrastive_weight · mean_q −log softmax(s)[pos]."""
    p_t = np_softmax(t / temperature)
    kl = np.sum(p_t * (np.log(p_t) - np_log_softmax(s / temperature)), 1).mean() * temperature ** 2
    nce = -np_log_softmax(s)[np.arange(len(s)), pos].mean()
    return kd_weight * kl + contrastive_weight * nce


def np_cosine_logits(q, c, scale):
    """``scale · cos(q_b, c_bk)`` for queries (B, D) and their lists (B, K, D)."""
    q = q / np.linalg.norm(q, axis=-1, keepdims=True)
    c = c / np.linalg.norm(c, axis=-1, keepdims=True)
    return scale * np.einsum("bd,bkd->bk", q, c)


def recall_from(sim, labels, ks=(1, 5)):
    """recall@k of leave-one-out retrieval from a similarity matrix (a same-class item among the
    k highest others)."""
    return recall_of(sim.copy(), labels, ks)[0]


def recall_at(emb, labels, ks=(1, 5)):
    """Leave-one-out retrieval by cosine over ``emb``: recall@k and each query's top-1 item."""
    e = emb / np.linalg.norm(emb, axis=1, keepdims=True)
    return recall_of(e @ e.T, labels, ks)


def recall_of(sim, labels, ks):
    np.fill_diagonal(sim, -np.inf)
    order = np.argsort(-sim, 1, kind="stable")[:, :max(ks)]
    hit = labels[order] == labels[:, None]
    return {k: float(hit[:, :k].any(1).mean()) for k in ks}, order[:, 0]


# -- the loss ---------------------------------------------------------------------


def test_loss_is_the_listwise_kl_plus_infonce():
    g = torch.Generator().manual_seed(4)
    s, t = torch.randn(5, 7, generator=g, dtype=torch.float64), 3 * torch.randn(5, 7, generator=g, dtype=torch.float64)
    pos = torch.tensor([0, 3, 6, 2, 2])
    for temperature, kd_w, c_w in ((1.0, 1.0, 0.0), (4.0, 1.0, 0.0), (2.0, 0.7, 0.3), (0.5, 0.0, 1.0)):
        expected = np_retrieval_loss(s.numpy(), t.numpy(), pos.numpy(), temperature, kd_w, c_w)
        assert expected > 0.05
        got = retrieval_loss(s, t, pos, temperature=temperature, kd_weight=kd_w, contrastive_weight=c_w)
        assert float(got) == pytest.approx(expected, rel=1e-12), (temperature, kd_w, c_w)
    r = Retrieval(temperature=2.0, kd_weight=0.7, contrastive_weight=0.3)
    assert float(r.loss(s, t, pos)) == pytest.approx(np_retrieval_loss(s.numpy(), t.numpy(), pos.numpy(), 2.0, 0.7,
                                                                       0.3), rel=1e-12)
    # a per-query offset of the teacher's scores is no ranking change: the KL does not move
    shifted = t + torch.arange(5, dtype=torch.float64)[:, None] * 10
    assert float(r.loss(s, shifted, pos)) == pytest.approx(float(r.loss(s, t, pos)), rel=1e-12)
    assert float(Retrieval(contrastive_weight=0.0).loss(t, t)) == pytest.approx(0.0, abs=1e-12)   # p_s = p_t
    with pytest.raises(InputError, match="needs each query's positive"):
        Retrieval().loss(s, t)
    with pytest.raises(InputError, match="needs the teacher's scores"):
        Retrieval().loss(s, None, pos)


class Towers(nn.Module):
    """A dual encoder of two linear towers (float64): ``query`` and ``candidate``."""

    def __init__(self, d_in=3, d_out=4, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.query = nn.Linear(d_in, d_out).double()
        self.candidate = nn.Linear(d_in, d_out).double()

    def forward(self, x):
        return self.query(x)


def toy_scorer(q, c):
    """A known pair score: minus the squared distance of the first two features."""
    return -((q[:, :2] - 2 * c[:, :2]) ** 2).sum(1)


def np_embed(linear, x):
    return x @ linear.weight.detach().numpy().T + linear.bias.detach().numpy()


@torch.no_grad()
def test_batches_score_each_query_against_its_own_candidates():
    """The loss of a batch, rebuilt in numpy from the towers' weights and the scorer's formula, for
    whole in-batch lists, drawn in-batch lists and explicit (B, K) lists."""
    g = torch.Generator().manual_seed(1)
    net = Towers()
    q, c = torch.randn(6, 3, generator=g, dtype=torch.float64), torch.randn(6, 3, generator=g, dtype=torch.float64)
    qe, ce = np_embed(net.query, q.numpy()), np_embed(net.candidate, c.numpy())
    cfg = dict(query_encoder="query", candidate_encoder="candidate", temperature=2.0, contrastive_weight=0.5,
               scale=5.0)

    t = np.array([[float(toy_scorer(q[i:i + 1], c[j:j + 1])) for j in range(6)] for i in range(6)])
    s = np_cosine_logits(qe, np.broadcast_to(ce, (6, 6, 4)), 5.0)
    expected = np_retrieval_loss(s, t, np.arange(6), 2.0, 1.0, 0.5)
    assert float(Retrieval(**cfg).batch_loss(net, toy_scorer, (q, c))) == pytest.approx(expected, rel=1e-10)

    drawn = Retrieval(candidates=3, **cfg)
    torch.manual_seed(7)
    index = drawn.layout((q, c)).index.numpy()
    assert index.shape == (6, 3) and (index[:, 0] == np.arange(6)).all()
    assert all(len(set(row)) == 3 for row in index)                         # no candidate twice in a list
    rows = np.arange(6)[:, None]
    expected = np_retrieval_loss(s[rows, index], t[rows, index], np.zeros(6, int), 2.0, 1.0, 0.5)
    torch.manual_seed(7)
    assert float(drawn.batch_loss(net, toy_scorer, (q, c))) == pytest.approx(expected, rel=1e-10)

    lists, pos = torch.randn(6, 4, 3, generator=g, dtype=torch.float64), torch.tensor([0, 1, 2, 3, 0, 1])
    le = np_embed(net.candidate, lists.numpy())
    t = np.array([[float(toy_scorer(q[i:i + 1], lists[i, k:k + 1])) for k in range(4)] for i in range(6)])
    expected = np_retrieval_loss(np_cosine_logits(qe, le, 5.0), t, pos.numpy(), 2.0, 1.0, 0.5)
    explicit = Retrieval(candidate_lists=True, **cfg)
    assert float(explicit.batch_loss(net, toy_scorer, (q, lists, pos))) == pytest.approx(expected, rel=1e-10)
    as_sequence = (q, list(lists), pos)                                     # B tensors (K, ...) work too
    assert float(explicit.batch_loss(net, toy_scorer, as_sequence)) == pytest.approx(expected, rel=1e-10)
    dot = Retrieval(candidate_lists=True, similarity="dot", kd_weight=0.0, **{**cfg, "scale": 1.0})
    expected = np_retrieval_loss(np.einsum("bd,bkd->bk", qe, le), t, pos.numpy(), 2.0, 0.0, 0.5)
    assert float(dot.batch_loss(net, None, (q, lists, pos))) == pytest.approx(expected, rel=1e-10)


# -- the digits retrieval task ----------------------------------------------------


class PairScorer(nn.Module):
    """The slow model: scores a (query, candidate) pair jointly as log P(same class | q, c) =
    log sum_k p(k | q) p(k | c), from a digits classifier run on both (one pass per pair).

    Not a transformer, and its score factorises (log <p_q, p_c>); small row-token cross-attention
    scorers trained here for a few seconds reached only 0.47-0.69 recall@1, worse than the
    students, so they had nothing to teach."""

    def __init__(self, classifier):
        super().__init__()
        self.classifier = classifier

    def forward(self, query, candidate):
        lq = torch.log_softmax(self.classifier(query), -1)
        lc = torch.log_softmax(self.classifier(candidate), -1)
        return torch.logsumexp(lq + lc, -1)


def tower(seed):
    """The fast model's embedding tower (shared by queries and candidates): a 64-64-32 MLP."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32))


def same_class_pairs(x, y, seed=0, batch=128):
    """Every training image as a query, its positive another image of the same class; shuffled
    batches of (queries, positives).  The batch's other candidates include same-class images that
    InfoNCE counts as negatives — the scorer knows better."""
    g = torch.Generator().manual_seed(seed)
    pos = torch.empty(len(x), dtype=torch.long)
    for i in range(len(x)):
        pool = torch.nonzero((y == y[i]) & (torch.arange(len(x)) != i)).flatten()
        pos[i] = pool[torch.randint(0, len(pool), (1,), generator=g)]
    perm = torch.randperm(len(x), generator=g)
    return [(x[perm[i:i + batch]], x[pos[perm[i:i + batch]]]) for i in range(0, len(x), batch)]


@pytest.fixture(scope="module")
def task(digits):
    """The scorer (over the first cached digits MLP teacher) and the training pairs."""
    xtr, ytr, _, _ = digits
    return PairScorer(copy.deepcopy(digit_teachers(digits)[0])), same_class_pairs(xtr, ytr)


def train_tower(task, seed, weights):
    scorer, data = task
    net = tower(seed)
    Retrieval(epochs=EPOCHS, lr=3e-3, seed=seed, progress=False, **weights).apply(net, scorer, data)
    return net


@pytest.fixture(scope="module")
def distilled(task):
    """The tower of seed 0, distilled from the scorer."""
    return train_tower(task, SEEDS[0], DISTILLED)


@pytest.fixture(scope="module")
def students(task, distilled):
    """Per seed: the tower trained contrastively alone (InfoNCE over the whole batch), and the
    same tower distilled from the scorer."""
    return {"contrastive": [train_tower(task, seed, dict(kd_weight=0.0)) for seed in SEEDS],
            "distilled": [distilled] + [train_tower(task, seed, DISTILLED) for seed in SEEDS[1:]]}


def embeddings(net, x):
    with torch.no_grad():
        return net(x).numpy()


@pytest.mark.slow
def test_distillation_from_the_scorer_beats_contrastive_training(digits, task, students):
    """Leave-one-out retrieval over the 450 digits test images (relevant: same class), 3 seeds,
    3 epochs each.  Measured (mean recall@1 / @5): scorer 0.971 / 0.971, contrastive
    0.963 / 0.992, distilled 0.969 / 0.990 — recall@1 up on two seeds, tied on one; recall@5
    no better (the scorer's own recall@5 is lower than the students')."""
    scorer, _ = task
    _, _, xte, yte = digits
    labels = yte.numpy()
    with torch.no_grad():
        scores = torch.stack([scorer(xte[i:i + 1].expand(len(xte), -1, -1, -1), xte) for i in range(len(xte))])
    print("scorer recall", recall_from(scores.numpy(), labels))
    got = {kind: [recall_at(embeddings(n, xte), labels)[0] for n in nets] for kind, nets in students.items()}
    mean = {kind: {k: float(np.mean([r[k] for r in rs])) for k in (1, 5)} for kind, rs in got.items()}
    print("recall@1/@5 per seed:", got, "mean:", mean)
    assert mean["distilled"][1] >= mean["contrastive"][1] + 0.004, mean
    assert all(d[1] >= c[1] for d, c in zip(got["distilled"], got["contrastive"])), got     # no seed worse
    assert mean["distilled"][5] >= mean["contrastive"][5] - 0.005, mean
    assert mean["distilled"][1] >= 0.95, mean


def test_the_tower_deploys_and_the_artifact_retrieves_what_torch_does(digits, distilled, tmp_path):
    """The distilled tower at arm-int8: leave-one-out retrieval over the 450 test digits from the
    artifact's embeddings.  Measured: recall@1 0.9733 (torch 0.9756), recall@5 0.9911 (0.9911),
    the same top-1 item retrieved for 96.7 % of the queries (near-duplicate digits swap places)."""
    xtr, _, xte, yte = digits
    net, labels = distilled, yte.numpy()
    art = sdk.deploy(net, "arm-int8", (xte[:50],), calibration=[xtr[i:i + 50] for i in range(0, 400, 50)],
                     output=tmp_path / "tower", progress=False)
    int8 = np.concatenate([art.run(xte[i:i + 50])[0] for i in range(0, len(xte), 50)])
    ref = embeddings(net, xte)
    (r_int8, top_int8), (r_ref, top_ref) = recall_at(int8, labels), recall_at(ref, labels)
    agree = float((top_int8 == top_ref).mean())
    print(f"int8 recall {r_int8}, torch {r_ref}, top-1 item agreement {agree:.4f}")
    assert abs(r_int8[1] - r_ref[1]) <= 0.01 and abs(r_int8[5] - r_ref[5]) <= 0.01, (r_int8, r_ref)
    assert agree >= 0.95, agree


# -- recipes, bad input, config ---------------------------------------------------


class DualEncoder(nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        self.query, self.candidate = tower(seed), tower(seed + 1)

    def forward(self, x):
        return self.query(x)


def test_a_yaml_retrieval_stage_trains_both_towers_from_the_given_scorer(digits, task):
    scorer, data = task
    data = data[:3]
    recipe = Recipe.from_yaml("""
stages:
  - method: retrieval
    config: {query_encoder: query, candidate_encoder: candidate, candidates: 16, temperature: 2.0,
             epochs: 2, lr: 0.003, progress: false}
""")
    model = DualEncoder()
    out = sdk.compress(model, recipe, data={"train": data}, teacher=scorer, progress=False)
    direct = DualEncoder()
    Retrieval(query_encoder="query", candidate_encoder="candidate", candidates=16, temperature=2.0, epochs=2,
              lr=0.003, progress=False).apply(direct, scorer, data)
    for k, v in direct.state_dict().items():                                # the stage is apply on 'train'
        assert torch.allclose(out.state_dict()[k], v, atol=1e-6), k
    assert not torch.equal(out.query[1].weight, model.query[1].weight)      # both towers trained, on a copy
    assert not torch.equal(out.candidate[1].weight, model.candidate[1].weight)
    with pytest.raises(InputError, match="needs a cross-attention scorer as teacher"):
        sdk.compress(model, recipe, data={"train": data}, progress=False)
    with pytest.raises(InputError, match="stage 'retrieval' needs the data stream"):
        sdk.compress(model, recipe, data={"val": data}, teacher=scorer, progress=False)


def test_bad_input_gets_named_errors():
    g = torch.Generator().manual_seed(0)
    net, q = Towers(), torch.randn(4, 3, generator=g, dtype=torch.float64)
    names = dict(query_encoder="query", candidate_encoder="candidate")
    with pytest.raises(InputError, match="needs a cross-attention scorer as teacher"):
        Retrieval(**names).apply(net, None, [(q, q)])
    with pytest.raises(InputError, match="4 queries and candidates \\(3, 3\\)"):
        Retrieval(**names).batch_loss(net, toy_scorer, (q, q[:3]))
    with pytest.raises(InputError, match="candidate_lists=True"):
        Retrieval(**names).batch_loss(net, toy_scorer, (q, q, torch.zeros(4, dtype=torch.long)))
    lists = Retrieval(candidate_lists=True, **names)
    ragged = [torch.randn(k, 3, generator=g, dtype=torch.float64) for k in (4, 4, 3, 4)]
    with pytest.raises(InputError, match="different shapes.*pad or trim"):
        lists.batch_loss(net, toy_scorer, (q, ragged, torch.zeros(4, dtype=torch.long)))
    with pytest.raises(InputError, match="needs candidates \\(B, K, ...\\) for the 4 queries"):
        lists.batch_loss(net, toy_scorer, (q, torch.randn(3, 4, 3, dtype=torch.float64), torch.zeros(4).long()))
    with pytest.raises(InputError, match="positive must be the \\(4,\\) index"):
        lists.batch_loss(net, toy_scorer, (q, torch.randn(4, 5, 3, dtype=torch.float64), torch.zeros(5).long()))
    with pytest.raises(InputError, match="integer index in \\[0, 5\\)"):
        lists.batch_loss(net, toy_scorer, (q, torch.randn(4, 5, 3, dtype=torch.float64), torch.tensor([0, 1, 5, 2])))
    with pytest.raises(InputError, match="one score per \\(query, candidate\\) pair \\(16 pairs\\)"):
        Retrieval(**names).batch_loss(net, lambda a, b: a[:2, 0], (q, q))
    apart = nn.ModuleDict({"query": nn.Linear(3, 4), "candidate": nn.Linear(3, 2)}).double()
    with pytest.raises(InputError, match="4 dimensions and the candidate embeddings 2"):
        Retrieval(**names).batch_loss(apart, toy_scorer, (q, q))
    with pytest.raises(ConfigError, match="query_encoder='tower'.*available: .*'query', 'candidate'"):
        Retrieval(query_encoder="tower").apply(net, toy_scorer, [(q, q)])
    for bad, match in (({"candidates": 1}, "candidates=1 leaves nothing"),
                       ({"candidates": 8, "candidate_lists": True}, "set candidates=0"),
                       ({"kd_weight": 0.0, "contrastive_weight": 0.0}, "both 0"),
                       ({"similarity": "l2"}, "similarity='l2' is not allowed"),
                       ({"temperature": 0.0}, "temperature=0.0 is out of range"),
                       ({"scale": -1.0}, "scale=-1.0 is out of range")):
        with pytest.raises(ConfigError, match=match):
            Retrieval(**bad)


def test_retrieval_config_is_a_training_config():
    check_training_config(Retrieval)
