import numpy as np
import pytest

from moeoffload import _native
from moeoffload.errors import InvalidArgumentError, ShapeError
from moeoffload.prefetch import ActivationPredictor, PrefetchConfig, plan

import torch


def counts(rows):
    return np.ascontiguousarray(np.array(rows, dtype=np.uint32).ravel())


def test_tracer_counts_and_layers_seen():
    t = _native.ActivationTracer(3, 4)
    t.record(0, np.array([1, 2], np.uint32))
    t.record(0, np.array([1], np.uint32))
    t.record(2, np.array([3], np.uint32))
    np.testing.assert_array_equal(t.matrix(), [[0, 2, 1, 0], [0, 0, 0, 0], [0, 0, 0, 1]])
    assert t.layers_seen == 3
    with pytest.raises(InvalidArgumentError):
        t.record(0, np.array([4], np.uint32))
    t.begin_sequence()
    assert t.matrix().sum() == 0 and t.layers_seen == 0


def test_history_is_bounded_and_deduplicated():
    h = _native.ActivationHistory(2, 2, 2)
    assert h.add(counts([[1, 0], [0, 1]]))
    assert not h.add(counts([[1, 0], [0, 1]]))  # exact duplicate
    assert not h.add(counts([[0, 0], [0, 0]]))  # nothing to learn from
    assert h.add(counts([[0, 1], [1, 0]]))
    assert h.add(counts([[2, 0], [0, 2]]))
    assert len(h) == 2  # the oldest went first
    np.testing.assert_array_equal(h.flat(), [0, 1, 1, 0, 2, 0, 0, 2])
    with pytest.raises(ShapeError):
        h.add(np.zeros(3, np.uint32))


def test_predict_matches_on_the_layers_seen():
    h = _native.ActivationHistory(2, 3, 10)
    h.add(counts([[4, 0, 0], [0, 4, 0]]))  # "topic A": layer 0 -> e0, layer 1 -> e1
    h.add(counts([[0, 0, 4], [0, 0, 4]]))  # "topic B"
    cur = counts([[1, 0, 0], [0, 0, 0]])   # first token, layer 0 chose e0
    p = h.predict(cur, 1, 1).reshape(2, 3)
    np.testing.assert_allclose(p, [[1, 0, 0], [0, 1, 0]])
    p2 = h.predict(cur, 1, 2).reshape(2, 3)  # both matches averaged
    np.testing.assert_allclose(p2, [[0.5, 0, 0.5], [0, 0.5, 0.5]])
    empty = _native.ActivationHistory(2, 3, 10)
    np.testing.assert_allclose(empty.predict(cur, 1, 1), np.full(6, 1 / 3))


def test_predictor_learns_a_repeated_sequence():
    rng = np.random.default_rng(0)
    L, E = 4, 8
    seq = rng.integers(0, E, (20, L, 2))
    p = ActivationPredictor(L, E, top_matches=1, self_weight=0.0)
    for _ in range(2):
        p.begin_sequence()
        for t in range(seq.shape[0]):
            for l in range(L):
                p.record(l, seq[t, l])
        p.end_sequence()
    p.begin_sequence()
    p.record(0, seq[0, 0])
    pred = p.predict()
    truth = np.stack([np.bincount(seq[:, l].ravel(), minlength=E) for l in range(L)]).astype(np.float32)
    np.testing.assert_allclose(pred, truth / truth.sum(1, keepdims=True), rtol=1e-6)


def test_plan_orders_by_priority_and_respects_limits():
    L, E = 4, 4
    pred = np.zeros((L, E), np.float32)
    pred[1] = [0.6, 0.3, 0.1, 0.0]
    pred[2] = [0.0, 0.9, 0.05, 0.05]
    items = plan(pred, 0, PrefetchConfig(depth=2, per_layer=2, min_probability=0.2))
    # layer 1 (d=1, weight 3/4): e0 0.45, e1 0.225; layer 2 (d=2, weight 1/2): e1 0.45
    assert [i for i, _ in items] == [1 * E + 0, 2 * E + 1, 1 * E + 1]
    assert [round(p, 4) for _, p in items] == [0.45, 0.45, 0.225]
    assert all(p > 0 for _, p in plan(pred, 0, PrefetchConfig(depth=3, per_layer=4, min_probability=0.0)))
    pred[0] = [0.2, 0.0, 0.0, 0.0]
    wrap = plan(pred, 3, PrefetchConfig(depth=2, per_layer=1, min_probability=0.0))
    # The next token's first layers: layer 0 (d=1) 0.2 * 3/4 = 0.15 < layer 1 (d=2) 0.6 * 1/2 = 0.3.
    assert wrap == [(1 * E + 0, pytest.approx(0.3)), (0 * E + 0, pytest.approx(0.15))]


def test_hidden_predictions_apply_the_next_layers_router():
    from conftest import mixtral_model

    from moeoffload.models.adapters import moe_layers
    from moeoffload.prefetch import hidden_predictions

    model = mixtral_model()
    layers = moe_layers(model)
    ids = torch.randint(0, model.config.vocab_size, (2, 5), generator=torch.Generator().manual_seed(0))
    got = hidden_predictions(model, ids)
    assert got.shape == (2, 5, len(layers), layers[0].experts.down_proj.shape[0])
    seen = {}
    hook = layers[0].norm.register_forward_pre_hook(lambda mod, args: seen.setdefault("h", args[0]))
    with torch.no_grad():
        model(input_ids=ids)
    hook.remove()
    nxt = layers[1]
    with torch.no_grad():
        want = torch.softmax(nxt.norm(seen["h"]).float() @ nxt.router.weight.float().T, -1)
    np.testing.assert_allclose(got[:, :, 0], want.numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got.sum(-1), 1.0, rtol=1e-4)


def test_recency_weights_recent_tokens():
    p = ActivationPredictor(1, 4, self_weight=1e6, recency=0.5)  # own counts dominate
    p.begin_sequence()
    for e in [0, 0, 0, 1]:
        p.record(0, [e])
    pred = p.predict()[0]
    # counts decayed: e0 = 0.5^3 + 0.5^2 + 0.5 = 0.875, e1 = 1
    assert pred[1] > pred[0]
    plain = ActivationPredictor(1, 4, self_weight=1e6, recency=1.0)
    plain.begin_sequence()
    for e in [0, 0, 0, 1]:
        plain.record(0, [e])
    assert plain.predict()[0][0] > plain.predict()[0][1]
    with pytest.raises(ValueError):
        ActivationPredictor(1, 4, recency=0.0)
