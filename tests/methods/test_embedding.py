"""embedding: the loss equals the L1-to-normalised-embedding formula; the frozen encoder is left
untouched; the student's projected embedding classifies digits against the encoder's class
prototypes (transfer into the encoder's space); usable from a YAML recipe; the student deploys."""

import copy

import numpy as np
import pytest
import torch
from torch import nn

import sdk
from distill_helpers import accuracy, batches, check_training_config, digit_teachers, mlp, np_ce
from plugins.distill.embedding import Embedding, embedding_loss
from sdk.errors import ConfigError, InputError
from sdk.recipe import Recipe

pytestmark = pytest.mark.usefixtures("one_thread")   # tiny models: one thread is faster


@pytest.fixture(scope="module")
def encoder(digits):
    """The frozen encoder: a trained digits MLP up to its second hidden layer (64-d, after ReLU)."""
    return copy.deepcopy(digit_teachers(digits)[1][:5])


def test_embedding_loss_is_l1_to_the_normalised_encoder_embedding():
    g = torch.Generator().manual_seed(3)
    p, e = torch.randn(5, 7, generator=g, dtype=torch.float64), 3 * torch.randn(5, 7, generator=g, dtype=torch.float64)
    pn, en = p.numpy(), e.numpy()
    unit = en / np.sqrt((en ** 2).sum(1, keepdims=True))
    expected = float(np.mean(np.abs(pn - unit).sum(1)))
    assert expected > 0.5
    assert float(embedding_loss(p, e)) == pytest.approx(expected, rel=1e-12)
    assert float(embedding_loss(p, 5 * e)) == pytest.approx(expected, rel=1e-12)      # the encoder's scale is moot
    z, y = torch.randn(5, 3, generator=g, dtype=torch.float64), torch.tensor([0, 1, 2, 0, 1])
    total = Embedding(weight=2.5, ce_weight=0.5).loss(p, e, y, logits=z)
    assert float(total) == pytest.approx(2.5 * expected + 0.5 * np_ce(z.numpy(), y.numpy()), rel=1e-12)
    assert float(Embedding(ce_weight=0.0).loss(p, e)) == pytest.approx(expected, rel=1e-12)   # unlabeled
    with pytest.raises(InputError, match="ce_weight > 0 needs labels"):
        Embedding().loss(p, e)


def prototype_accuracy(embed, encoder, xtr, ytr, xte, yte):
    """Nearest class prototype by cosine: prototypes = mean normalised encoder embedding per class
    on the training set; the test set is embedded by ``embed``."""
    with torch.no_grad():
        e = nn.functional.normalize(encoder(xtr).reshape(len(xtr), -1), dim=1)
        protos = nn.functional.normalize(torch.stack([e[ytr == c].mean(0) for c in range(10)]), dim=1)
        q = nn.functional.normalize(embed(xte), dim=1)
    return float(((q @ protos.T).argmax(1) == yte).float().mean())


def test_embedding_transfers_into_the_encoder_space_leaves_it_frozen_and_deploys(digits, encoder, tmp_path):
    """The student never sees the prototypes: its projected embedding lands where the encoder's is,
    so the encoder's classifier works on it.  Measured (digits test set): the encoder
    itself 0.944, the distilled student 0.927, the same student untrained 0.109 (chance)."""
    xtr, ytr, xte, yte = digits
    frozen = copy.deepcopy(encoder.state_dict())
    grads = [p.requires_grad for p in encoder.parameters()]
    student, keys = mlp((32,), 5), set(mlp((32,), 5).state_dict())
    untrained = Embedding(student_layer="2", epochs=1, max_steps=1, lr=1e-9, progress=False)
    untrained.apply(mlp((32,), 5), encoder, batches(xtr, ytr))
    e = Embedding(student_layer="2", epochs=15, lr=1e-2, progress=False)
    e.apply(student, encoder, batches(xtr, ytr))
    own = prototype_accuracy(encoder, encoder, xtr, ytr, xte, yte)
    got = prototype_accuracy(lambda x: e.embed(student, x), encoder, xtr, ytr, xte, yte)
    chance = prototype_accuracy(lambda x: untrained.embed(mlp((32,), 5), x), encoder, xtr, ytr, xte, yte)
    acc = accuracy(student, xte, yte)
    print(f"prototype accuracy: encoder {own:.4f}, distilled student {got:.4f}, untrained {chance:.4f}; "
          f"student's own head {acc:.4f}")
    assert got >= 0.9 and got >= own - 0.05, (got, own)
    assert chance <= 0.4, chance
    for k, v in encoder.state_dict().items():                               # frozen: not a bit moved
        assert torch.equal(v, frozen[k]), k
    assert [p.requires_grad for p in encoder.parameters()] == grads
    assert set(student.state_dict()) == keys                                # the projection stays off the student
    art = sdk.deploy(student, "arm-int8", (xte[:1],), calibration=[xtr[i:i + 64] for i in range(0, 256, 64)],
                     output=tmp_path / "embedding", progress=False)
    int8 = np.concatenate([art.run(xte[i:i + 1])[0] for i in range(0, 100)]).argmax(1)
    with torch.no_grad():
        agree = float((int8 == student(xte[:100]).argmax(1).numpy()).mean())
    assert agree >= 0.97, agree


def test_a_yaml_embedding_stage_with_named_streams_uses_the_given_encoder(digits, encoder):
    xtr, ytr, xte, yte = digits
    recipe = Recipe.from_yaml("""
stages:
  - method: embedding
    config: {student_layer: "2", epochs: 3, lr: 0.01, weight: 1.0, progress: false}
""")
    model = mlp((32,), 5)
    out = sdk.compress(model, recipe, data={"train": batches(xtr, ytr), "val": batches(xte, yte)},
                       teacher=encoder, progress=False)
    direct = mlp((32,), 5)
    Embedding(student_layer="2", epochs=3, lr=0.01, progress=False).apply(direct, encoder, batches(xtr, ytr))
    assert not torch.equal(out[1].weight, model[1].weight)                  # trained a copy
    for k, v in direct.state_dict().items():                                # the stage is apply on 'train'
        assert torch.allclose(out.state_dict()[k], v, atol=1e-6), k
    with pytest.raises(InputError, match="stage 'embedding' needs the data stream"):
        sdk.compress(model, recipe, data={"val": batches(xte, yte)}, teacher=encoder, progress=False)
    with pytest.raises(ConfigError, match="student_layer='fc'.*available"):
        Embedding(student_layer="fc").apply(model, encoder, batches(xtr, ytr))


def test_embedding_config_is_a_training_config():
    check_training_config(Embedding)
