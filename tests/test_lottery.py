"""Tests for chapter11.lottery: schedule, rewinding, controls, records and resume."""

import json

import pytest
import torch
from torch import nn

from chapter11 import lottery
from chapter11.data import Split, loaders
from chapter11.lottery import (
    LotteryConfig,
    batches,
    early_stop,
    early_stop_loop,
    find_ticket,
    find_tickets,
    holdout,
    load_lottery,
    random_masks,
    random_masks_loop,
    rewind,
    rewind_error,
    rewind_loop,
    seed_curve,
    seed_table,
    snapshot,
    sparsity_schedule,
    sparsity_schedule_loop,
)
from chapter11.masks import apply_masks, masks_of
from chapter11.train import seed_everything, train


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run faster on one thread, and the machine is shared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_model():
    return nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))


@pytest.fixture(scope="module")
def tiny_data():
    g = torch.Generator().manual_seed(0)
    X = torch.randn(160, 6, generator=g)
    y = (X[:, 0] > 0).long() + (X[:, 1] > 0.5).long()  # 3 classes, learnable
    Xt = torch.randn(60, 6, generator=g)
    yt = (Xt[:, 0] > 0).long() + (Xt[:, 1] > 0.5).long()
    return Split(X, y, Xt, yt, 3)


TINY = dict(rounds=2, epochs=2, batch_size=16, eval_every=3, val_size=32, lr=1e-2)


# --- schedule ---------------------------------------------------------------


@pytest.mark.parametrize("fn", [sparsity_schedule_loop, sparsity_schedule])
def test_schedule_hand_computed(fn):
    # 20% of what remains: densities 1, .8, .64, .512
    assert fn(0.2, 3) == pytest.approx([0.0, 0.2, 0.36, 0.488], abs=1e-12)
    assert fn(0.5, 0) == [0.0]


def test_schedule_twins_agree():
    for p in (0.1, 0.2, 0.37, 0.9):
        assert sparsity_schedule_loop(p, 12) == pytest.approx(sparsity_schedule(p, 12), abs=1e-12)


@pytest.mark.parametrize("bad", [(0.0, 3), (1.0, 3), (float("nan"), 3), (0.2, -1), (0.2, 1.5)])
def test_schedule_rejects_bad_input(bad):
    with pytest.raises((ValueError, TypeError)):
        sparsity_schedule(*bad)


# --- rewinding ---------------------------------------------------------------


def _masked_model(seed=0):
    torch.manual_seed(seed)
    model = tiny_model()
    masks = {name: (torch.rand_like(p) > 0.5).float() for name, p in model.named_parameters() if name.endswith("weight")}
    return model, masks


@pytest.mark.parametrize("fn", [rewind_loop, rewind])
def test_rewind_restores_snapshot_on_survivors(fn):
    model, masks = _masked_model()
    theta0 = snapshot(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)  # pretend training moved every weight
    fn(model, theta0, masks)
    for name, p in model.named_parameters():
        if name in masks:
            keep = masks[name].bool()
            assert torch.equal(p[keep], theta0[name][keep])  # exact, not approx
            assert (p[~keep] == 0).all()
        else:
            assert torch.equal(p, theta0[name])  # biases rewound too
    assert rewind_error(model, theta0) == 0.0
    assert set(masks_of(model)) == set(masks)


def test_rewind_twins_agree_and_masks_only_shrink():
    a, masks = _masked_model(1)
    b = tiny_model()
    b.load_state_dict(a.state_dict())
    state = {k: v + 0.5 for k, v in snapshot(a).items()}
    first = {k: (torch.rand_like(v) > 0.3).float() for k, v in masks.items()}
    for m in (a, b):
        apply_masks(m, first)
    rewind_loop(a, state, masks)
    rewind(b, state, masks)
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(pa, pb), na
    for name in masks:  # the old mask is multiplied in, never replaced
        assert torch.equal(masks_of(a)[name], first[name] * masks[name])


def test_rewind_rejects_mismatched_state():
    model, masks = _masked_model()
    state = snapshot(model)
    with pytest.raises(ValueError, match="state"):
        rewind(model, {k: v for k, v in state.items() if k != "0.bias"})
    with pytest.raises(ValueError, match="shape"):
        rewind(model, {**state, "0.weight": torch.zeros(3, 3)})
    with pytest.raises(ValueError, match="masks"):
        rewind(model, state, {"nope.weight": torch.ones(2)})
    with pytest.raises(ValueError, match="0 and 1"):
        rewind(model, state, {"0.weight": torch.full((16, 6), 0.5)})


def test_rewind_error_sees_a_wrong_weight():
    model, masks = _masked_model()
    state = snapshot(model)
    rewind(model, state, masks)
    with torch.no_grad():
        model[4].bias[0] += 0.25
    assert rewind_error(model, state) == pytest.approx(0.25)


# --- controls ----------------------------------------------------------------


def test_random_masks_twins_agree_and_keep_counts():
    _, masks = _masked_model()
    a, b = random_masks_loop(masks, seed=3), random_masks(masks, seed=3)
    assert a.keys() == b.keys() == masks.keys()
    for name in masks:
        assert torch.equal(a[name], b[name])
        assert int(a[name].sum()) == int(masks[name].sum())
        assert a[name].shape == masks[name].shape
    assert any(not torch.equal(a[n], masks[n]) for n in masks)  # actually random
    c = random_masks(masks, seed=4)
    assert any(not torch.equal(a[n], c[n]) for n in masks)


def test_random_masks_rejects_bad_masks():
    with pytest.raises(ValueError):
        random_masks({})
    with pytest.raises(ValueError, match="0 and 1"):
        random_masks({"w": torch.tensor([0.5, 1.0])})


# --- early stopping and holdout ----------------------------------------------


@pytest.mark.parametrize("fn", [early_stop_loop, early_stop])
def test_early_stop_first_minimum(fn):
    assert fn([5, 10, 15, 20], [2.0, 1.0, 1.0, 3.0]) == (1, 10)
    assert fn([7], [0.3]) == (0, 7)
    with pytest.raises(ValueError, match="equally long"):
        fn([1, 2], [0.1])


def test_early_stop_twins_agree_on_random_curves():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        losses = torch.randint(0, 5, (12,), generator=g).float().tolist()  # many ties
        steps = list(range(10, 130, 10))
        assert early_stop_loop(steps, losses) == early_stop(steps, losses)


def test_holdout_is_a_partition(tiny_data):
    part, _ = holdout(tiny_data, 40, seed=1)
    assert len(part.X_train) == 120 and len(part.X_test) == 40
    rows = {tuple(r.tolist()) for r in torch.cat([part.X_train, part.X_test])}
    assert rows == {tuple(r.tolist()) for r in tiny_data.X_train}
    with pytest.raises(ValueError, match="val_size"):
        holdout(tiny_data, 160)


# --- config -------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(prune_fraction=1.0), "prune_fraction"),
        (dict(rounds=-1), "rounds"),
        (dict(scope="local"), "scope"),
        (dict(controls=("reinit", "lucky")), "controls"),
        (dict(rewind_step=-2), "rewind_step"),
        (dict(epochs=0), "epochs"),
        (dict(patience=-1), "patience"),
        (dict(patience=2.5), "patience"),
        (dict(lr=float("nan")), "lr"),
    ],
)
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LotteryConfig(**kwargs)


def test_config_json_round_trip():
    config = LotteryConfig(exclude="fc3", controls=("reinit",), rewind_step=5)
    assert config.exclude == ("fc3",)
    assert LotteryConfig.from_json(json.loads(json.dumps(config.to_json()))) == config


# --- the search ---------------------------------------------------------------


@pytest.fixture(scope="module")
def search(tiny_data, tmp_path_factory):
    path = tmp_path_factory.mktemp("lottery")
    config = LotteryConfig(**TINY)
    return find_ticket(tiny_model, tiny_data, config, path=path, progress_bar=False), path


def test_search_follows_schedule_and_shrinks(search):
    result, _ = search
    total = sum(m.numel() for m in result.masks[1].values())
    for rec, target in zip(result.rounds, sparsity_schedule(0.2, 2)):
        assert abs(rec["sparsity"] - target) <= 1 / total
        assert rec["target_sparsity"] == pytest.approx(target)
        assert rec["rewind_error"] == 0.0
    for prev, cur in zip(result.masks[1:], result.masks[2:]):
        for name in cur:
            assert (cur[name] <= prev[name]).all()
    assert set(result.rounds[1]["runs"]) == {"ticket", "reinit", "random_mask"}
    run = result.rounds[2]["runs"]["ticket"]
    assert len(run["steps"]) == len(run["val_loss"]) == len(run["val_accuracy"]) == len(run["train_loss"])
    assert run["early_stop_step"] == run["steps"][run["early_stop_index"]]
    assert run["early_stop_val_accuracy"] == run["val_accuracy"][run["early_stop_index"]]
    assert 0.0 <= run["early_stop_accuracy"] <= 1.0
    assert run["stopped_early"] is False and run["total_steps"] == 2 * 8  # patience 0: all epochs (128 examples, batch 16)
    xs, ys = result.curve("random_mask")
    assert xs[0] == 1.0 and len(xs) == 3 and ys[0] == result.rounds[0]["runs"]["ticket"]["early_stop_accuracy"]
    with pytest.raises(ValueError, match="key"):
        result.curve("ticket", "steps")


def test_load_lottery_reads_back_the_same(search):
    result, path = search
    loaded = load_lottery(path)
    assert loaded.rounds == result.rounds and loaded.config == result.config
    for a, b in zip(loaded.masks, result.masks):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(FileNotFoundError):
        load_lottery(path / "missing")


def test_controls_start_where_they_should(tiny_data, monkeypatch):
    """Ticket: m * theta_0. Reinit: same mask, other values. Random mask: same counts, theta_0 values."""
    starts = []
    real = lottery.train_run

    def spy(model, *args, **kwargs):
        starts.append(({k: v.clone() for k, v in model.state_dict().items()}, kwargs.get("desc")))
        return real(model, *args, **kwargs)

    monkeypatch.setattr(lottery, "train_run", spy)
    result = find_ticket(tiny_model, tiny_data, LotteryConfig(**{**TINY, "rounds": 1}), progress_bar=False)
    (dense, _), (ticket, _), (reinit, _), (rand, _) = starts
    theta0, masks = result.theta_0, result.masks[1]
    for name, mask in masks.items():
        assert torch.equal(dense[name], theta0[name])
        assert torch.equal(ticket[name], theta0[name] * mask)
        assert torch.equal(reinit[name + "_mask"], mask)
        assert torch.equal(reinit[name] != 0, mask.bool())
        assert not torch.equal(reinit[name], ticket[name])
        rmask = rand[name + "_mask"]
        assert int(rmask.sum()) == int(mask.sum())
        assert torch.equal(rand[name], theta0[name] * rmask)
    assert any(not torch.equal(rand[n + "_mask"], masks[n]) for n in masks)


def test_late_rewinding_snapshot_is_step_k(tiny_data):
    k = 4
    config = LotteryConfig(**{**TINY, "rounds": 1, "rewind_step": k, "controls": ()})
    result = find_ticket(tiny_model, tiny_data, config, progress_bar=False)
    # replay the dense run by hand for k steps: same seed, same batches
    seed_everything(config.seed)
    model = tiny_model()
    part, _ = holdout(tiny_data, config.val_size, seed=config.data_seed)
    train_loader = batches(part.X_train, part.y_train, config.batch_size, seed=config.data_seed)
    train(model, train_loader, lr=config.lr, max_steps=k, progress_bar=False)
    for name, p in model.state_dict().items():
        assert torch.equal(result.rewind_state[name], p), name
        assert not torch.equal(result.theta_0[name], p)
    assert result.rounds[1]["rewind_error"] == 0.0
    with pytest.raises(ValueError, match="rewind_step"):
        find_ticket(tiny_model, tiny_data, LotteryConfig(**{**TINY, "rounds": 0, "rewind_step": 10_000}), progress_bar=False)


def test_resume_after_interruption_redoes_nothing(tiny_data, tmp_path, monkeypatch, search):
    reference, _ = search
    calls = []
    real = lottery.train_run

    def crashing(*args, **kwargs):
        calls.append(kwargs.get("desc"))
        if len(calls) == 6:  # dense + round 1 (3 runs) + 1 run of round 2, then the power goes out
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(lottery, "train_run", crashing)
    config = LotteryConfig(**TINY)
    with pytest.raises(KeyboardInterrupt):
        find_ticket(tiny_model, tiny_data, config, path=tmp_path, progress_bar=False)
    saved = json.loads((tmp_path / "records.json").read_text())
    assert [r["round"] for r in saved["rounds"]] == [0, 1]

    calls.clear()
    result = find_ticket(tiny_model, tiny_data, config, path=tmp_path, progress_bar=False)
    assert calls == ["round 2 ticket", "round 2 reinit", "round 2 random mask"]
    assert result.rounds == reference.rounds  # bit-identical to the uninterrupted search

    calls.clear()
    again = find_ticket(tiny_model, tiny_data, config, path=tmp_path, progress_bar=False)
    assert calls == [] and again.rounds == result.rounds
    shorter = find_ticket(tiny_model, tiny_data, LotteryConfig(**{**TINY, "rounds": 1}), path=tmp_path, progress_bar=False)
    assert calls == [] and len(shorter.rounds) == 2

    with pytest.raises(ValueError, match="different settings"):
        find_ticket(tiny_model, tiny_data, LotteryConfig(**{**TINY, "lr": 0.5}), path=tmp_path, progress_bar=False)


def test_find_ticket_rejects_bad_arguments(tiny_data):
    with pytest.raises(TypeError, match="model_fn"):
        find_ticket(None, tiny_data)
    with pytest.raises(TypeError, match="config"):
        find_ticket(tiny_model, tiny_data, config={"rounds": 1})
    with pytest.raises(TypeError, match="data"):
        find_ticket(tiny_model, (1, 2))


# --- early stopping inside a run ------------------------------------------------


def _run_once(tiny_data, **overrides):
    config = LotteryConfig(**{**TINY, **overrides})
    part, _ = holdout(tiny_data, config.val_size, seed=0)
    train_loader, val_loader = loaders(part, config.batch_size, seed=0)
    _, test_loader = loaders(tiny_data, config.batch_size, seed=0)
    seed_everything(0)
    model = tiny_model()
    record, _ = lottery.train_run(model, train_loader, val_loader, test_loader, config, progress_bar=False)
    return model, record, (val_loader, test_loader)


def test_patience_stops_and_restores_the_best_weights(tiny_data):
    # lr 0.5 overshoots, so the validation loss soon stops improving
    model, record, (val_loader, test_loader) = _run_once(tiny_data, epochs=40, patience=3, eval_every=2, lr=0.5)
    i = record["early_stop_index"]
    assert record["stopped_early"] is True
    assert len(record["steps"]) == i + 1 + 3  # three evaluations without a new minimum, then stop
    assert record["total_steps"] == record["steps"][-1] < 40 * len(loaders(holdout(tiny_data, 32)[0], 16)[0])
    assert record["val_loss"][i] == min(record["val_loss"]) < record["val_loss"][-1]
    # the weights in the model are those of the minimum: re-scoring reproduces its numbers
    from chapter11.train import evaluate
    assert evaluate(model, val_loader)["loss"] == pytest.approx(record["val_loss"][i], abs=1e-6)
    assert evaluate(model, test_loader)["accuracy"] == record["early_stop_accuracy"]


def test_without_patience_every_epoch_runs(tiny_data):
    _, record, _ = _run_once(tiny_data, epochs=3, patience=0, eval_every=2, lr=0.5)
    steps_per_epoch = len(loaders(holdout(tiny_data, 32)[0], 16)[0])
    assert record["stopped_early"] is False and record["total_steps"] == 3 * steps_per_epoch


def test_eval_every_beyond_the_run_is_refused(tiny_data):
    with pytest.raises(ValueError, match="eval_every"):
        _run_once(tiny_data, epochs=1, eval_every=10_000)


# --- several seeds ------------------------------------------------------------


def test_find_tickets_seeds_and_tables(tiny_data, tmp_path):
    config = LotteryConfig(**{**TINY, "rounds": 1, "controls": ("reinit",)})
    results = find_tickets(tiny_model, tiny_data, config, seeds=[3, 4], path=tmp_path, progress_bar=False)
    assert [r.config.seed for r in results] == [3, 4]
    assert (tmp_path / "seed_3" / "records.json").is_file() and (tmp_path / "seed_4" / "records.json").is_file()
    assert not torch.equal(results[0].theta_0["0.weight"], results[1].theta_0["0.weight"])  # other seed, other init
    single = find_ticket(tiny_model, tiny_data, LotteryConfig(**{**TINY, "rounds": 1, "controls": ("reinit",), "seed": 4}), progress_bar=False)
    assert single.rounds == results[1].rounds  # same as one search with that seed
    table = seed_table(results, runs=("ticket", "reinit"))
    assert table["seeds"] == [3, 4] and len(table["density"]) == 2
    assert table["ticket"][1] == [r.rounds[1]["runs"]["ticket"]["early_stop_accuracy"] for r in results]
    assert table["reinit"][0] == table["ticket"][0]  # round 0 is the shared dense run
    xs, ys = seed_curve(table, "reinit")
    assert xs == table["density"] and ys[1].n == 2 and ys[1].mean == pytest.approx(sum(table["reinit"][1]) / 2)
    with pytest.raises(ValueError, match="not trained"):
        seed_table(results, runs=("random_mask",))
    with pytest.raises(ValueError, match="differ only in their seed"):
        seed_table([results[0], find_ticket(tiny_model, tiny_data, LotteryConfig(**{**TINY, "rounds": 1, "controls": ("reinit",), "lr": 0.02}), progress_bar=False)])
    with pytest.raises(ValueError, match="seeds"):
        find_tickets(tiny_model, tiny_data, config, seeds=[1, 1])
    with pytest.raises(ValueError, match="run"):
        seed_curve(table, "random_mask")


def test_batches_cover_every_example_once_per_epoch():
    X, y = torch.arange(20.).reshape(10, 2), torch.arange(10)
    loader = batches(X, y, 4, seed=1)
    epochs = [[b.tolist() for _, b in loader] for _ in range(2)]
    assert [len(b) for b in epochs[0]] == [4, 4, 2] and len(loader) == 3
    assert all(sorted(sum(e, [])) == list(range(10)) for e in epochs)
    assert epochs[0] != epochs[1]  # a new order every epoch
    again = batches(X, y, 4, seed=1)
    assert [b.tolist() for _, b in again] == epochs[0]  # same seed, same order
    for xb, yb in batches(X, y, 3):
        assert torch.equal(xb, X[yb])  # rows stay paired with their labels
    with pytest.raises(ValueError, match="batch_size"):
        batches(X, y, 0)
    with pytest.raises(ValueError, match="same length"):
        batches(X, y[:5], 2)
