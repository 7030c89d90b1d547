"""Random shapes, dtypes and values thrown at the public functions (issue 8): each call either gives a
correct result (the right shape and dtype, finite inside the documented domain) or raises a
ValueError / TypeError with a message, and it raises exactly when the input is outside what the
function documents. Never another exception, a crash or a NaN."""

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dvae.losses import bits_per_dim, logit_laplace_nll, map_pixels, unmap_pixels
from dvae.model import DVAE
from dvae.schedules import KINDS, Schedule

# Deterministic (the same examples every run) and quick: the whole file runs in a few seconds.
CHECK = settings(max_examples=150, deadline=None, derandomize=True, database=None,
                 suppress_health_check=[HealthCheck.too_slow])

FLOATS = [torch.float16, torch.bfloat16, torch.float32, torch.float64]
OTHERS = [torch.int64, torch.uint8, torch.bool, torch.complex64]


def outcome(call):
    """(result, None) or (None, the ValueError / TypeError); any other exception fails the test."""
    try:
        return call(), None
    except (ValueError, TypeError) as error:
        assert str(error).strip(), f"{type(error).__name__} without a message"
        return None, error


def tensor(shape, dtype, low, high, seed, specials=()):
    """Values drawn in [low, high] (as `dtype`), with `specials` (e.g. the end points) written in."""
    g = torch.Generator().manual_seed(seed)
    values = torch.rand(shape, generator=g, dtype=torch.float64) * (high - low) + low
    flat = values.view(-1)
    for i, special in enumerate(specials[: flat.numel()]):
        flat[(i * 7919) % flat.numel()] = special
    if dtype == torch.bool:
        return values > (low + high) / 2
    if not (dtype.is_floating_point or dtype.is_complex):
        return values.round().to(dtype)
    return values.to(dtype)


shapes = st.lists(st.integers(0, 3), min_size=0, max_size=4)


@st.composite
def broadcast_partners(draw, shape):
    """A shape that broadcasts with `shape` (drop leading dims, set some to 1) or, rarely, one that may not."""
    if draw(st.integers(0, 9)) == 0:
        return draw(shapes)
    partner = list(shape[draw(st.integers(0, len(shape))):])
    return [1 if draw(st.booleans()) else n for n in partner]


def promoted(*tensors):
    """torch's promotion among floating tensors: those with dimensions decide over 0-dim ones."""
    deciding = [t for t in tensors if t.dim() > 0] or tensors
    dtype = deciding[0].dtype
    for t in deciding[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def broadcasts(*shapes_):
    try:
        return list(torch.broadcast_shapes(*shapes_))
    except RuntimeError:
        return None


# --------------------------------------------------------------------------- the logit-Laplace density


@st.composite
def nll_arguments(draw):
    shape = draw(shapes)
    dtypes = [draw(st.sampled_from(FLOATS + OTHERS if draw(st.integers(0, 5)) == 0 else FLOATS)) for _ in range(3)]
    half = torch.float16 in dtypes
    mu_range, ls_low, ls_high = (100.0, -4.4, 5.0) if half else (1e4, -20.0, 20.0)  # the docstring's domain
    seed = draw(st.integers(0, 2**31))
    x = tensor(shape, dtypes[0], 0.0, 1.0, seed, specials=(0.0, 1.0))
    mu = tensor(draw(broadcast_partners(shape)), dtypes[1], -mu_range, mu_range, seed + 1, specials=(0.0,))
    log_scale = tensor(draw(broadcast_partners(shape)), dtypes[2], ls_low, ls_high, seed + 2, specials=(ls_low,))
    eps = draw(st.one_of(st.floats(0.01, 0.45), st.just(0.1),
                         st.sampled_from([-0.1, 0.5, 2.0, math.nan, math.inf, "0.1", None])))
    arguments = [x, mu, log_scale]
    if draw(st.integers(0, 9)) == 0:  # a plain number or list where a tensor belongs
        arguments[draw(st.integers(0, 2))] = draw(st.sampled_from([0.5, [0.5], None]))
    return (*arguments, eps)


def nll_arguments_are_valid(x, mu, log_scale, eps):
    tensors = (x, mu, log_scale)
    return (all(isinstance(t, torch.Tensor) and t.is_floating_point() for t in tensors)
            and broadcasts(*(t.shape for t in tensors)) is not None
            and isinstance(eps, float) and 0.0 <= eps < 0.5)


@CHECK
@given(nll_arguments())
def test_logit_laplace_nll_and_bits_per_dim_compute_or_refuse(arguments):
    x, mu, log_scale, eps = arguments
    nll, error = outcome(lambda: logit_laplace_nll(x, mu, log_scale, eps))
    valid = nll_arguments_are_valid(x, mu, log_scale, eps)
    assert (error is None) == valid, error
    if not valid:
        return
    assert list(nll.shape) == broadcasts(x.shape, mu.shape, log_scale.shape)
    assert nll.dtype == promoted(x, mu, log_scale)
    assert torch.isfinite(nll).all(), "a non-finite value inside the documented domain"
    bits, error = outcome(lambda: bits_per_dim(x, mu, log_scale, eps))
    assert (error is None) == (nll.numel() > 0), error
    if bits is not None:
        assert bits.shape == () and torch.isfinite(bits)


@CHECK
@given(st.sampled_from(FLOATS), shapes, st.integers(0, 2**31))
def test_the_gradient_is_finite_inside_the_domain(dtype, shape, seed):
    if dtype == torch.float16:
        return  # float16 autograd is not a training set-up on the CPU; its value is covered above
    x = tensor(shape, dtype, 0.0, 1.0, seed, specials=(0.0, 1.0))
    mu = tensor(shape, dtype, -1e4, 1e4, seed + 1).requires_grad_()
    log_scale = tensor(shape, dtype, -20.0, 20.0, seed + 2, specials=(-20.0,)).requires_grad_()
    logit_laplace_nll(x, mu, log_scale).sum().backward()
    assert torch.isfinite(mu.grad).all() and torch.isfinite(log_scale.grad).all()


@CHECK
@given(st.sampled_from(FLOATS + OTHERS), shapes, st.integers(0, 2**31),
       st.one_of(st.floats(0.0, 0.45), st.sampled_from([-0.1, 0.5, math.nan, "0.1"])))
def test_map_and_unmap_pixels_compute_or_refuse(dtype, shape, seed, eps):
    x = tensor(shape, dtype, 0.0, 1.0, seed, specials=(0.0, 1.0))
    valid = dtype in FLOATS and isinstance(eps, float) and 0.0 <= eps < 0.5
    y, error = outcome(lambda: map_pixels(x, eps))
    assert (error is None) == valid, error
    back, error = outcome(lambda: unmap_pixels(x, eps))
    assert (error is None) == valid, error
    if not valid:
        return
    for result in (y, back):
        assert result.shape == x.shape and result.dtype == dtype and torch.isfinite(result).all()
    if x.numel() == 0:
        return
    assert back.min() >= 0 and back.max() <= 1
    tolerance = 1e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-5
    assert y.double().min() >= eps - tolerance and y.double().max() <= 1 - eps + tolerance
    torch.testing.assert_close(unmap_pixels(y, eps).double(), x.double(), atol=tolerance, rtol=0)


# --------------------------------------------------------------------------- DVAE.encode / DVAE.decode


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return DVAE(n_hid=8, blocks_per_group=1, groups=2, K=16, n_init=8).eval()  # 2x2 pixels per token


@st.composite
def images(draw):
    rank = draw(st.sampled_from([4, 4, 4, 3, 5]))
    shape = [draw(st.integers(0, 2)), draw(st.sampled_from([3, 3, 3, 1])), draw(st.integers(0, 7)),
             draw(st.integers(0, 7)), 2][:rank]
    dtype = draw(st.sampled_from(FLOATS + OTHERS if draw(st.integers(0, 4)) == 0 else FLOATS))
    low, high, specials = draw(st.sampled_from([
        (0.0, 1.0, (0.0, 1.0)),            # the domain, end points included
        (0.0, 1.0, ()),
        (0.0, 255.0, ()),                  # 8-bit values as floats: refused
        (-1.0, 1.0, (-1.0,)),              # normalised to [-1, 1]: refused
        (0.0, 1.0, (math.nan,)),
        (0.0, 1.0, (math.inf,)),
    ]))
    return tensor(shape, dtype, low, high, draw(st.integers(0, 2**31)), specials)


@CHECK
@given(images())
def test_encode_gives_tokens_or_refuses(tiny, x):
    tokens, error = outcome(lambda: tiny.encode(x))
    in_domain = x.is_floating_point() and (x.numel() == 0 or bool(torch.isfinite(x).all() and x.min() >= 0
                                                                   and x.max() <= 1))
    valid = x.dim() == 4 and x.shape[1] == 3 and in_domain and all(n > 0 and n % 2 == 0 for n in x.shape[2:])
    assert (error is None) == valid, error
    if valid:
        assert tokens.shape == (x.shape[0], x.shape[2] // 2, x.shape[3] // 2) and tokens.dtype == torch.int64
        assert tokens.numel() == 0 or (tokens.min() >= 0 and tokens.max() < 16)


@CHECK
@given(st.lists(st.integers(0, 4), min_size=1, max_size=4),
       st.sampled_from([torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.uint16,
                        torch.uint32, torch.uint64, torch.float32, torch.bool]),
       st.sampled_from([(0, 15), (0, 15), (-3, 15), (0, 40)]), st.integers(0, 2**31))
def test_decode_gives_images_or_refuses(tiny, shape, dtype, value_range, seed):
    values = tensor(shape, torch.int64, *value_range, seed, specials=value_range)
    tokens = values.to(dtype)
    as_int = tokens.long()
    in_range = tokens.numel() == 0 or bool(as_int.min() >= 0 and as_int.max() < 16)
    valid = (tokens.dim() == 3 and dtype not in (torch.float32, torch.bool) and min(tokens.shape[1:]) > 0
             and in_range)
    with torch.no_grad():
        decoded, error = outcome(lambda: tiny.decode(tokens))
    assert (error is None) == valid, error
    if valid:
        assert decoded.shape == (shape[0], 3, 2 * shape[1], 2 * shape[2]) and decoded.dtype == torch.float32
        assert torch.isfinite(decoded).all() and ((decoded >= 0) & (decoded <= 1)).all()


def test_encode_refuses_images_on_another_device(tiny):
    with pytest.raises(ValueError, match="move them with"):
        tiny.encode(torch.rand(1, 3, 4, 4, device="meta"))


# --------------------------------------------------------------------------- schedules

numbers = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-10, 10),
                    st.floats(-1e3, 1e3), st.sampled_from([1e308, -1e308, 5e-324, 0.0]))
step_counts = st.one_of(st.integers(-5, 200), st.integers(0, 10**30), st.floats(0, 1e6), st.just(math.inf),
                        st.just(-1))
steps_taken = st.one_of(st.integers(-10, 300), st.integers(-10**30, 10**30), st.just(10**400),
                        st.floats(allow_nan=True, allow_infinity=True))


def finite_number(value):
    return isinstance(value, (int, float)) and (isinstance(value, int) or math.isfinite(value))


@CHECK
@given(st.one_of(st.sampled_from(KINDS), st.just("quadratic")), st.one_of(numbers, st.just("1.0")), numbers,
       step_counts, step_counts, steps_taken)
def test_schedules_give_a_value_between_start_and_end_or_refuse(kind, start, end, steps, warmup, step):
    schedule, error = outcome(lambda: Schedule(kind, start, end, steps, warmup))
    valid = (kind in KINDS and all(finite_number(v) for v in (start, end, steps, warmup)) and steps >= 0
             and warmup >= 0 and (kind != "exponential" or (start > 0 and end > 0)))
    assert (error is None) == valid, error
    if not valid:
        return
    value, error = outcome(lambda: schedule(step))
    assert (error is None) == (finite_number(step) and step >= 0), error
    if error is not None:
        return
    assert isinstance(value, float) and math.isfinite(value)
    target = end if kind != "constant" else start
    if step < warmup:
        assert min(0.0, start) <= value <= max(0.0, start)
    elif step >= warmup + steps:
        assert value == target
    else:
        assert min(start, target) <= value <= max(start, target)
