import math

import pytest
import torch
from sqlalchemy import select

from stepcli.config import TrainConfig
from stepcli.engine import train
from stepcli.store import Eval, Run, Step, open_store


def small(setup: str, **overrides) -> TrainConfig:
    values = dict(setup=setup, device="cpu", epochs=2, batch_size=128, subset_size=1000, seed=0)
    values.update(overrides)
    return TrainConfig(**values)


def stored(store, run_id):
    with store.session() as session:
        run = session.get(Run, run_id)
        steps = session.scalars(select(Step).where(Step.run_id == run_id).order_by(Step.step)).all()
        evals = session.scalars(
            select(Eval).where(Eval.run_id == run_id).order_by(Eval.epoch)
        ).all()
    return run, steps, evals


def test_run_stores_every_step_and_epoch(tmp_path, mnist_cpu):
    store = open_store(str(tmp_path / "r.db"))
    result = train(small("1", lr=1e-3), store, mnist_cpu)
    run, steps, evals = stored(store, result.run_id)
    assert run.status == "finished"
    # 1000 images at batch 128: 7 full batches and one of 104, so 8 steps per epoch.
    assert [s.step for s in steps] == list(range(1, 17))
    assert [s.epoch for s in steps] == [1] * 8 + [2] * 8
    assert [e.epoch for e in evals] == [0, 1, 2]
    assert evals[-1].step == 16
    seconds = [s.seconds for s in steps]
    assert all(b > a for a, b in zip(seconds, seconds[1:], strict=False))
    assert run.train_seconds == pytest.approx(evals[-1].seconds)
    assert run.final_train_loss == pytest.approx(sum(s.loss for s in steps[8:]) / 8)
    assert evals[-1].train_loss < evals[0].train_loss
    assert run.network_params == 203_530
    assert run.budget_params == 203_530
    assert run.auxiliary_state == 2 * 203_530
    assert run.optimizer_impl == "foreach"


def test_huge_lr_stored_as_diverged(tmp_path, mnist_cpu):
    store = open_store(str(tmp_path / "r.db"))
    result = train(small("sgd", lr=1e4), store, mnist_cpu)
    run, steps, evals = stored(store, result.run_id)
    assert run.status == "diverged"
    assert run.diverged_step is not None
    assert steps[-1].step == run.diverged_step
    last = steps[-1].loss
    assert not math.isfinite(last) or last > 1e3
    assert all(math.isfinite(s.loss) and s.loss <= 1e3 for s in steps[:-1])
    assert run.final_train_loss is None


def test_same_seed_bit_identical(tmp_path, mnist_cpu):
    store = open_store(str(tmp_path / "r.db"))
    first = train(small("3", alpha0=0.1, meta_lr=0.1), store, mnist_cpu)
    second = train(small("3", alpha0=0.1, meta_lr=0.1), store, mnist_cpu)
    _, steps_a, _ = stored(store, first.run_id)
    _, steps_b, _ = stored(store, second.run_id)
    assert [s.loss for s in steps_a] == [s.loss for s in steps_b]


@pytest.mark.parametrize("setup", ["2", "3", "4", "5", "6"])
def test_learned_setups_lower_loss(tmp_path, mnist_cpu, setup):
    store = open_store(str(tmp_path / "r.db"))
    result = train(small(setup), store, mnist_cpu)
    run, steps, evals = stored(store, result.run_id)
    assert run.status == "finished"
    assert evals[-1].train_loss < evals[0].train_loss
    assert run.step_size_params == run.network_params
    expected_decays = run.network_params if setup in ("3", "6") else 0
    assert run.decay_params == expected_decays


def test_interrupt_keeps_rows(tmp_path, mnist_cpu):
    class StopAt:
        def __init__(self, step):
            self.step = step

        def start(self, *args):
            pass

        def advance(self, step):
            if step == self.step:
                raise KeyboardInterrupt

        def stats(self, *args):
            pass

        def finish(self, status):
            pass

    store = open_store(str(tmp_path / "r.db"))
    with pytest.raises(KeyboardInterrupt):
        train(small("1", lr=1e-3), store, mnist_cpu, progress=StopAt(11))
    with store.session() as session:
        run = session.scalars(select(Run)).one()
        steps = session.scalars(select(Step).order_by(Step.step)).all()
    assert run.status == "interrupted"
    assert [s.step for s in steps] == list(range(1, 12))
    assert run.steps_done == 11


def test_matched_start_across_setups(tmp_path, mnist_cpu):
    # Setups 1 and 2 share the network and seed, so their first minibatch loss is identical.
    store = open_store(str(tmp_path / "r.db"))
    a = train(small("1", lr=1e-3, epochs=1), store, mnist_cpu)
    b = train(small("2", epochs=1), store, mnist_cpu)
    _, steps_a, evals_a = stored(store, a.run_id)
    _, steps_b, evals_b = stored(store, b.run_id)
    assert steps_a[0].loss == steps_b[0].loss
    assert evals_a[0].train_loss == evals_b[0].train_loss
    assert not torch.isnan(torch.tensor(steps_a[0].loss))


def test_non_finite_final_loss_is_diverged(tmp_path, mnist_cpu):
    # One huge step: the minibatch loss before it is finite, the weights after it are not.
    store = open_store(str(tmp_path / "r.db"))
    config = small("sgd", lr=1e30, subset_size=100, batch_size=100, epochs=1)
    result = train(config, store, mnist_cpu)
    run, steps, evals = stored(store, result.run_id)
    assert run.status == "diverged"
    assert run.diverged_step == 1
    assert run.steps_done == len(steps) == 1
    assert run.final_train_loss is None
