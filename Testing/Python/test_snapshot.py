"""Issue 21: undo snapshots in reused buffers, Adam's multi-tensor step and ``class_map`` give
exactly what the deep copies of ``state_dict``, the per-tensor Adam loop and ``torch.argmax``
gave, on real torch models."""

from __future__ import annotations

import copy

import numpy as np
import torch

from OAIMSSegment.methods import get_method
from OAIMSSegment.model import class_map, load_model
from OAIMSSegment.session import AdaptConfig, InteractiveSession
from OAIMSSegment.snapshot import SnapshotPool, StateSnapshot


def train_steps(model, optimizer, n, seed):
    """``n`` Adam steps of ``model`` on a random 32 x 32 input (the seed picks it)."""
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(n):
        x = torch.randn(1, model.net.in_channels, 32, 32, generator=generator)
        optimizer.zero_grad(set_to_none=True)
        model(x).pow(2).mean().backward()
        optimizer.step()


def full_state(model, optimizer):
    """Every weight and every optimizer state value, in order, for exact comparison."""
    state = optimizer.state_dict()["state"]
    return [t.detach().clone() for t in model.state_dict().values()] + [
        value.clone() if torch.is_tensor(value) else value for index in sorted(state) for value in state[index].values()]


def assert_identical(a, b):
    assert len(a) == len(b)
    assert all(torch.equal(x, y) if torch.is_tensor(x) else x == y for x, y in zip(a, b))


def test_a_snapshot_restores_exactly_what_load_state_dict_of_a_deep_copy_restores(tiny_model):
    reference, fast = copy.deepcopy(tiny_model), copy.deepcopy(tiny_model)
    optimizers = [torch.optim.Adam(m.parameters(), lr=1e-2) for m in (reference, fast)]
    for model, optimizer in zip((reference, fast), optimizers):
        train_steps(model, optimizer, 3, seed=1)
    saved = copy.deepcopy({"model": reference.state_dict(), "optimizer": optimizers[0].state_dict()})
    snapshot = StateSnapshot().capture(fast, optimizers[1], {})
    for model, optimizer in zip((reference, fast), optimizers):
        train_steps(model, optimizer, 2, seed=2)  # the steps that undo reverts
    assert not torch.equal(next(fast.parameters()), saved["model"][next(iter(saved["model"]))])
    reference.load_state_dict(saved["model"])
    optimizers[0].load_state_dict(saved["optimizer"])
    snapshot.restore(fast, optimizers[1], get_method("frozen")(fast))
    assert_identical(full_state(reference, optimizers[0]), full_state(fast, optimizers[1]))
    for model, optimizer in zip((reference, fast), optimizers):
        train_steps(model, optimizer, 2, seed=3)  # and the moments carry on alike
    assert_identical(full_state(reference, optimizers[0]), full_state(fast, optimizers[1]))


def test_a_snapshot_before_the_first_step_restores_a_fresh_optimizer(tiny_model):
    reference = copy.deepcopy(tiny_model)
    fast_optimizer = torch.optim.Adam(tiny_model.parameters(), lr=1e-2)
    snapshot = StateSnapshot().capture(tiny_model, fast_optimizer, {})
    train_steps(tiny_model, fast_optimizer, 2, seed=1)
    snapshot.restore(tiny_model, fast_optimizer, get_method("frozen")(tiny_model))
    assert len(fast_optimizer.state) == 0  # Adam starts its moments again, as after load_state_dict
    reference_optimizer = torch.optim.Adam(reference.parameters(), lr=1e-2)
    for model, optimizer in ((reference, reference_optimizer), (tiny_model, fast_optimizer)):
        train_steps(model, optimizer, 2, seed=4)
    assert_identical(full_state(reference, reference_optimizer), full_state(tiny_model, fast_optimizer))


def test_released_snapshots_lend_their_buffers_and_restoring_does_not_alias_them(tiny_model):
    optimizer = torch.optim.Adam(tiny_model.parameters(), lr=1e-2)
    train_steps(tiny_model, optimizer, 1, seed=1)
    pool = SnapshotPool(keep=1)
    first = pool.capture(tiny_model, optimizer, {})
    pointers = [t.data_ptr() for t in first._weights]
    train_steps(tiny_model, optimizer, 1, seed=2)
    first.restore(tiny_model, optimizer, get_method("frozen")(tiny_model))
    buffers = {t.data_ptr() for state in first._optimizer for t in state.values()}
    assert not buffers & {t.data_ptr() for state in optimizer.state.values() for t in state.values()}
    pool.release(first, None, {"model": {}})  # None and state dicts are ignored
    second = pool.capture(tiny_model, optimizer, {})
    assert second is first and [t.data_ptr() for t in second._weights] == pointers
    assert pool.capture(tiny_model, optimizer, {}) is not first  # none left: a new one


def test_adam_multi_tensor_step_is_the_per_tensor_step_bit_for_bit():
    model = load_model("brain-lesion-flair")
    states = []
    for foreach in (None, True):
        trained = copy.deepcopy(model)
        optimizer = torch.optim.Adam(trained.parameters(), lr=1e-3, foreach=foreach)
        train_steps(trained, optimizer, 3, seed=5)
        states.append(full_state(trained, optimizer))
    assert_identical(*states)
    assert not torch.equal(states[0][0], next(iter(model.state_dict().values())))


def test_class_map_is_torch_argmax_with_ties_and_nan(tiny_model, disk_image):
    card = tiny_model.card
    tiny_model.card = type(card)(**{**card.__dict__, "labels": {"background": 0, "a": 1, "b": 2}})
    three = type(tiny_model)(tiny_model.card)
    prepared = three.prepare(disk_image[0])
    with torch.no_grad():
        logits = three.logits(prepared, [])
    for scores, dim in ((logits, 1), (torch.softmax(logits, 1)[0], 0)):
        assert torch.equal(class_map(scores, dim), scores.argmax(dim=dim))
    ties = torch.tensor([[0.5, 0.2, float("nan"), 0.3, 0.4], [0.5, 0.7, 0.1, float("nan"), 0.4],
                         [0.1, 0.7, float("nan"), 0.3, 0.4]])
    assert torch.equal(class_map(ties, 0), ties.argmax(dim=0))


def session_run(model, reuse):
    """Images through one session (the second reuses the first's buffers): clicks, undo, discard,
    accept; every mask, the accept's Dice, every weight and moment."""
    session = InteractiveSession(model, "pi+mi", AdaptConfig(lr=1e-2), reuse_graphs=reuse)
    rng = np.random.default_rng(7)
    record = []
    for image_index in range(2):
        image = rng.normal(size=(64, 64)).astype(np.float32)
        image[20:40, 20:44] += 3.0
        session.start(image)
        for click in [((30, 30), 1), ((5, 5), 0), None, ((35, 40), 1)]:
            record.append(session.undo() if click is None else session.add_click(*click).mask)
        if image_index == 0:
            session.discard()
        else:
            record.append(session.accept().dice_after)
        record.extend(full_state(model, session.optimizer))
    return record


def test_a_session_with_reused_buffers_matches_the_deep_copy_path_over_images(tiny_model):
    old, new = session_run(copy.deepcopy(tiny_model), False), session_run(copy.deepcopy(tiny_model), True)
    assert len(old) == len(new)
    for a, b in zip(old, new):
        assert np.array_equal(a, b) if isinstance(a, np.ndarray) else (torch.equal(a, b) if torch.is_tensor(a) else a == b)
