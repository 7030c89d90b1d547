import math

import pytest

from dvae.schedules import Schedule, constant


def test_cosine_goes_from_start_to_end_then_holds():
    s = Schedule("cosine", 1.0, 1 / 16, 100)
    assert s(0) == 1.0
    assert s(50) == pytest.approx((1 + 1 / 16) / 2)
    assert s(100) == pytest.approx(1 / 16) and s(10_000) == pytest.approx(1 / 16)
    values = [s(i) for i in range(101)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_linear_exponential_constant():
    assert Schedule("linear", 0.0, 6.6, 10)(5) == pytest.approx(3.3)
    e = Schedule("exponential", 0.4, 0.05, 30)
    assert e(10) == pytest.approx(0.4 * (0.05 / 0.4) ** (1 / 3))
    assert e(30) == pytest.approx(0.05) and e(99) == pytest.approx(0.05)
    assert constant(0.2)(0) == 0.2 and constant(0.2)(10**6) == 0.2


def test_warmup_then_cosine():
    s = Schedule("cosine", 1e-3, 1e-5, 100, warmup=10)
    assert s(0) == pytest.approx(1e-4)
    assert s(9) == pytest.approx(1e-3)
    assert s(10) == pytest.approx(1e-3)
    assert s(60) == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5 * (1 + math.cos(math.pi / 2)))
    assert s(110) == pytest.approx(1e-5)


def test_zero_steps_jumps_to_end():
    assert Schedule("cosine", 1.0, 0.5, 0)(0) == 0.5


@pytest.mark.parametrize("kwargs, match", [
    (dict(kind="quadratic", start=1, end=0, steps=1), "quadratic"),
    (dict(kind="exponential", start=0.0, end=1.0, steps=1), "start and end > 0"),
    (dict(kind="linear", start=1, end=0, steps=-1), "steps"),
])
def test_bad_schedules_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        Schedule(**kwargs)


def test_a_huge_step_holds_the_end_and_a_negative_one_is_refused():
    s = Schedule("cosine", 1.0, 0.5, 10, warmup=3)
    assert s(10**400) == 0.5 and s(10**30) == 0.5
    with pytest.raises(ValueError, match="step -1 must be >= 0"):
        s(-1)


@pytest.mark.parametrize("kind", ["linear", "cosine", "exponential"])
def test_values_stay_between_start_and_end_at_the_ends_of_the_float_range(kind):
    low, high = (1e-300, 1e300) if kind == "exponential" else (-1e308, 1e308)
    for start, end in ((low, high), (high, low)):
        values = [Schedule(kind, start, end, 10)(step) for step in range(11)]
        assert all(math.isfinite(v) and low <= v <= high for v in values)
        assert values[0] == start and values[-1] == end


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(kind="linear", start="1", end=0, steps=1), TypeError, "start must be a number"),
    (dict(kind="linear", start=1, end=float("nan"), steps=1), ValueError, "end must be finite"),
    (dict(kind="linear", start=1, end=0, steps=float("inf")), ValueError, "steps must be finite"),
])
def test_non_numbers_and_non_finite_settings_are_refused(kwargs, error, match):
    with pytest.raises(error, match=match):
        Schedule(**kwargs)
