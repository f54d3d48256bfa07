"""Stage three: the weighted loss, the budgets, and refusing keep-lists that do not fit the data."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.config import load_config
from pipeline.data import load_data
from pipeline.models import build_model
from pipeline.retrain import RetrainError, check_keep_list, retrain_epochs, retrain_on
from pipeline.train import fit, seed_everything, weighted_mean


def test_weight_two_counts_a_sample_twice():
    torch.manual_seed(0)
    logits = torch.randn(3, 4, requires_grad=True)
    y = torch.tensor([0, 2, 1])
    ce = F.cross_entropy(logits, y, reduction="none")
    weighted = weighted_mean(ce, torch.tensor([2.0, 1.0, 1.0]))
    twice = F.cross_entropy(logits[[0, 0, 1, 2]], y[[0, 0, 1, 2]], reduction="sum")
    # mean_i(w_i CE_i) over B = 3 samples is the sum over the batch with sample 0 twice, over B
    torch.testing.assert_close(weighted * 3, twice)
    g_weighted, = torch.autograd.grad(weighted * 3, logits)
    g_twice, = torch.autograd.grad(twice, logits)
    torch.testing.assert_close(g_weighted, g_twice)
    assert weighted_mean(ce, None) == ce.mean()


def synthetic_cfg(*extra):
    return load_config(None, ["data.name=synthetic", "data.synthetic_samples=120", "model.name=mlp",
                              "model.width=4", "train.epochs=3", "train.batch_size=16", "train.num_threads=1",
                              *extra])


def test_unit_weights_equal_plain_cross_entropy():
    cfg = synthetic_cfg()
    data = load_data(cfg.data)
    states = []
    for weights in (None, np.ones(len(data.train))):
        seed_everything(0)
        model = build_model(cfg.model, input_shape=data.train.input_shape, num_classes=data.num_classes)
        fit(model, data.train, None, cfg.train, augment=False, sample_weights=weights, progress=False,
            log=lambda _: None)
        states.append(model.state_dict())
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_weights_change_training():
    cfg = synthetic_cfg()
    data = load_data(cfg.data)
    weights = np.where(np.arange(len(data.train)) % 2 == 0, 1.5, 0.5)
    states = []
    for w in (None, weights):
        seed_everything(0)
        model = build_model(cfg.model, input_shape=data.train.input_shape, num_classes=data.num_classes)
        fit(model, data.train, None, cfg.train, augment=False, sample_weights=w, progress=False, log=lambda _: None)
        states.append(model.state_dict())
    assert not all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_budgets():
    assert retrain_epochs("same_epochs", epochs=20, num_samples=1000, n_keep=300, batch_size=100) == 20
    # 20 epochs x 10 steps = 200 steps; 3 steps an epoch on 300 samples -> 67 epochs
    assert retrain_epochs("same_steps", epochs=20, num_samples=1000, n_keep=300, batch_size=100) == 67


def test_retrain_on_reports_and_trains_on_the_kept_samples():
    cfg = synthetic_cfg()
    data = load_data(cfg.data)
    ids = np.arange(0, 120, 2)
    m = retrain_on(cfg, data, ids, np.ones(len(ids)), progress=False, log=lambda _: None)
    assert m["n_keep"] == 60 and m["kept_fraction"] == 0.5 and m["epochs"] == 3
    assert len(m["history"]) == 3 and 0.0 <= m["final_test_accuracy"] <= 1.0
    assert m["budget"] == "same_epochs" and m["weighted"] is False


def test_keep_list_with_unknown_id_or_other_store_is_refused():
    ids, w = np.array([0, 5, 120]), np.ones(3)
    with pytest.raises(RetrainError, match=r"keep.csv: sample_id = 120: expected an id in \[0, 120\)"):
        check_keep_list("keep.csv", ids, w, num_samples=120, expected_fingerprint="a" * 64, made_from=None)
    with pytest.raises(RetrainError, match="made from another store"):
        check_keep_list("keep.csv", ids[:2], w[:2], num_samples=120, expected_fingerprint="a" * 64,
                        made_from="b" * 64)
    check_keep_list("keep.csv", ids[:2], w[:2], num_samples=120, expected_fingerprint="a" * 64, made_from="a" * 64)
