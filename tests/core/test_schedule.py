"""The learning-rate schedule every trainer shares. No framework."""

import pytest

from revnet_core.schedule import cosine_schedule, warmup_steps


def test_cosine_schedule_with_warmup():
    f = cosine_schedule(warmup=4, total=20, min_ratio=0.1)
    assert [f(i) for i in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == 1.0
    assert f(12) == pytest.approx(0.55)
    assert f(20) == pytest.approx(0.1) and f(50) == pytest.approx(0.1)
    values = [f(i) for i in range(4, 21)]
    assert values == sorted(values, reverse=True)


def test_no_warmup_starts_at_the_peak():
    f = cosine_schedule(warmup=0, total=10, min_ratio=0.0)
    assert f(0) == 1.0 and f(10) == pytest.approx(0.0)


def test_default_warmup_is_a_tenth_of_the_run_at_most_100():
    assert [warmup_steps(s) for s in (5, 200, 5000)] == [0, 20, 100]
    assert warmup_steps(5000, 7) == 7 and warmup_steps(5000, 0) == 0
