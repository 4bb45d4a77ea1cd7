"""The training log's ETA: the planned last step at the window's rate, or the time budget's end
when that comes first (a budgeted demo on a slow box stops there, not at train.steps)."""
from types import SimpleNamespace

from training.trainer import _Metrics


def _metrics(steps_in_window: int, t_start: float) -> _Metrics:
    m = object.__new__(_Metrics)  # no tracker or files: only the ETA rule is under test
    m.steps, m.t_start = steps_in_window, t_start
    return m


def _trainer(step: int, steps: int, budget: float):
    return SimpleNamespace(step=step, cfg=SimpleNamespace(steps=steps, time_budget_s=budget))


def test_eta_follows_the_rate_without_a_budget():
    m = _metrics(10, t_start=0.0)
    assert m._eta(_trainer(100, 1000, 0), now=50.0, dt=5.0) == 900 * 0.5


def test_eta_stops_at_the_time_budget():
    m = _metrics(10, t_start=0.0)
    assert m._eta(_trainer(100, 1000, 390), now=50.0, dt=5.0) == 340.0  # 450 s by rate, 340 s left
    assert m._eta(_trainer(100, 1000, 390), now=500.0, dt=5.0) == 0.0
    assert m._eta(_trainer(990, 1000, 390), now=50.0, dt=5.0) == 5.0     # the steps end first
