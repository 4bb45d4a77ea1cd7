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


def test_progress_line_eta_stops_at_the_deadline():
    """The stage progress line (`mlcd INFO train: 135/1,000 step ... ETA`) follows the same rule:
    a budgeted training's line said 19 min with ~2.6 left."""
    from pipeline.core.dist import DistContext
    from pipeline.core.tracking import Progress
    line = {}
    for deadline in (0.0, 60.0):
        p = Progress(1000, "train", DistContext(), unit="step", replicated=True, deadline_s=deadline)
        p.t0 -= 10.0  # 10 s in, 100 steps done: 90 s left by rate
        p.done = 100
        line[deadline] = p.line()
        p.close()
    assert "ETA 1m30s" in line[0.0], line
    assert "ETA 50s" in line[60.0], line
