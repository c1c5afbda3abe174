import numpy as np
import pytest

from moeoffload import _native
from moeoffload.errors import InvalidArgumentError, ShapeError
from moeoffload.prefetch import PrefetchConfig, decision_step, plan

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
    p = decision_step(L, E, None, "activation", self_weight=0.0)
    for _ in range(2):
        p.begin_sequence()
        for t in range(seq.shape[0]):
            for l in range(L):
                assert p.step(l, seq[t, l].astype(np.uint32)) == []  # no prefetch config: no plan
        p.end_sequence()
    p.begin_sequence()
    p.step(0, seq[0, 0].astype(np.uint32))
    pred = p.prediction()
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
    from moeoffload.errors import InvalidArgumentError

    for bad in (np.ones(6), np.full((L, E), np.nan)):  # an unpacking ValueError; NaN priorities into the cache
        with pytest.raises(InvalidArgumentError, match="prediction"):
            plan(bad, 0, PrefetchConfig())


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
    hooks = [ml.norm.register_forward_pre_hook(lambda mod, args, l=ml.index: seen.setdefault(l, args[0]))
             for ml in layers]
    with torch.no_grad():
        model(input_ids=ids)
    for h in hooks:
        h.remove()
    for l in range(len(layers)):  # every layer from its own residual (calling a norm once fired its hooks too)
        nxt = layers[(l + 1) % len(layers)]
        with torch.no_grad():
            want = torch.softmax(nxt.norm(seen[l]).float() @ nxt.router.weight.float().T, -1)
        np.testing.assert_allclose(got[:, :, l], want.numpy(), rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got.sum(-1), 1.0, rtol=1e-4)


def step_all(p, layer, experts):
    for e in experts:
        p.step(layer, np.array([e], np.uint32))
    return p.prediction()


def test_recency_weights_recent_tokens():
    p = decision_step(1, 4, PrefetchConfig(recency=0.5), "lru", self_weight=1e6)  # own counts dominate
    p.begin_sequence()
    pred = step_all(p, 0, [0, 0, 0, 1])[0]
    # counts decayed: e0 = 0.5^3 + 0.5^2 + 0.5 = 0.875, e1 = 1
    assert pred[1] > pred[0]
    plain = decision_step(1, 4, PrefetchConfig(recency=1.0), "lru", self_weight=1e6)
    plain.begin_sequence()
    assert step_all(plain, 0, [0, 0, 0, 1])[0][0] > plain.prediction()[0][1]
    with pytest.raises(InvalidArgumentError, match="recency"):
        decision_step(1, 4, PrefetchConfig(recency=0.0), "lru")


def test_decision_step_equals_its_parts_on_a_random_trace():
    """One native step = record, the history's match blended with the sequence's own decayed rows, the
    source by config, plan_prefetch: checked against that recipe written out in numpy."""
    rng = np.random.default_rng(3)
    L, E, k = 5, 8, 2
    hist = _native.ActivationHistory(L, E, 16)
    for _ in range(6):
        hist.add(rng.integers(0, 4, (L, E)).astype(np.uint32).ravel())
    for source in ("activation", "hidden", "combined"):
        cfg = PrefetchConfig(source=source, depth=2, per_layer=3, min_probability=0.02, top_matches=2, recency=0.7)
        step = decision_step(L, E, cfg, "activation", history=hist, self_weight=0.5)
        tracer = _native.ActivationTracer(L, E)
        own = np.zeros((L, E), np.float32)
        step.begin_sequence()
        for t in range(3):
            for l in range(L):
                ids = rng.choice(E, k, replace=False).astype(np.uint32)
                hidden = rng.dirichlet(np.ones(E)).astype(np.float32)
                got = step.step(l, ids, hidden)
                tracer.record(l, ids)
                own[l] *= np.float32(0.7)
                own[l][ids] += 1
                matched = hist.predict(tracer.matrix().ravel(), tracer.layers_seen, 2).reshape(L, E)
                rows = own.sum(1, keepdims=True)
                w = np.where(rows > 0, 0.5, 0.0).astype(np.float32)
                want = (matched + w * np.divide(own, rows, out=np.zeros_like(own), where=rows > 0)) / (1 + w)
                np.testing.assert_allclose(step.prediction(), want, rtol=1e-5, atol=1e-7)
                src = step.prediction().copy()
                if source == "hidden":
                    src[:] = 0
                    src[(l + 1) % L] = hidden
                elif source == "combined":
                    src[(l + 1) % L] = 0.5 * (src[(l + 1) % L] + hidden)
                assert got == plan(src, l, cfg)
        np.testing.assert_array_equal(step.matrix(), tracer.matrix())
        assert step.end_sequence()


def test_decision_step_refuses_bad_input_and_changes_nothing():
    step = decision_step(2, 4, PrefetchConfig(source="hidden"), "lru")
    assert step.needs_hidden and not step.predicts
    step.begin_sequence()
    with pytest.raises(InvalidArgumentError, match="router probabilities"):
        step.step(0, np.array([1], np.uint32))
    with pytest.raises(ShapeError):
        step.step(0, np.array([1], np.uint32), np.ones(3, np.float32))
    with pytest.raises(InvalidArgumentError, match="non-finite"):
        step.step(0, np.array([1], np.uint32), np.array([np.nan, 0, 0, 0], np.float32))
    with pytest.raises(InvalidArgumentError, match="out of range"):
        step.step(0, np.array([4], np.uint32), np.ones(4, np.float32))
    with pytest.raises(InvalidArgumentError, match="out of range"):
        step.step(2, np.array([0], np.uint32), np.ones(4, np.float32))
    assert step.matrix().sum() == 0  # nothing recorded by the refused steps
    with pytest.raises(ShapeError):
        decision_step(2, 4, None, "lru", history=_native.ActivationHistory(3, 4, 8))
    with pytest.raises(InvalidArgumentError, match="prefetch source"):
        _native.DecisionStep(2, 4, None, "sometimes", False)


def test_decision_step_sets_the_cache_index_priorities():
    L, E = 3, 4
    idx = _native.CacheIndex(1 << 20, "activation", L, E, 1000)
    step = decision_step(L, E, PrefetchConfig(depth=1, per_layer=1, min_probability=0.0), "activation")
    step.begin_sequence()
    step.step(1, np.array([2], np.uint32), None, idx)
    pred = step.prediction()
    for eid in range(L * E):  # the index took the prediction, distances counted from layer 1
        layer, e = divmod(eid, E)
        assert idx.activation_priority(eid) == pytest.approx(pred[layer, e] * (1 - ((layer - 1) % L) / L))


def test_incremental_matching_gives_the_history_predict_bits():
    """The decision step's incremental matcher equals ActivationHistory.predict exactly, also after the
    history changes under it (another sequence added, the oldest dropped)."""
    rng = np.random.default_rng(5)
    L, E = 6, 16
    hist = _native.ActivationHistory(L, E, 8)
    for _ in range(8):
        hist.add(rng.integers(0, 5, (L, E)).astype(np.uint32).ravel())
    step = decision_step(L, E, PrefetchConfig(top_matches=3), "activation", history=hist, self_weight=0.0)
    tracer = _native.ActivationTracer(L, E)
    for s in range(3):
        step.begin_sequence()
        tracer.begin_sequence()
        for t in range(4):
            for l in range(L):
                ids = rng.choice(E, 3, replace=False).astype(np.uint32)
                step.step(l, ids)
                tracer.record(l, ids)
                want = hist.predict(tracer.matrix().ravel(), tracer.layers_seen, 3).reshape(L, E)
                np.testing.assert_array_equal(step.prediction(), want)
                if t == 1 and l == 2:  # the history changes mid-sequence
                    hist.add(rng.integers(0, 5, (L, E)).astype(np.uint32).ravel())
        step.end_sequence()
