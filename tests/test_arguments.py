"""Arguments users get wrong, or give in another type: bounds, output dtypes, budgets."""

import fractions

import numpy as np
import pytest
import torch
from conftest import max_error

from moeoffload import BudgetError, InvalidBoundError, UnsupportedDtypeError, codec
from moeoffload.cache import parse_budget

MAX_BUDGET = 2**50  # the documented limit (1 PiB)


@pytest.mark.parametrize("name", codec.CODECS)
@pytest.mark.parametrize("eb", [np.float32(0.01), np.float64(0.01), np.float16(0.01), np.array(0.01),
                                torch.tensor(0.01), torch.tensor(0.01, dtype=torch.float64),
                                torch.tensor(0.01, dtype=torch.bfloat16), np.int64(1), torch.tensor(1)],
                         ids=lambda v: f"{type(v).__name__}-{getattr(v, 'dtype', '')}")
def test_bound_as_numpy_scalar_or_0d_tensor(name, eb):
    torch.manual_seed(0)
    x = torch.randn(20, 30)
    ct = codec.compress(x, eb, codec=name)
    assert ct.eb == pytest.approx(float(eb)) and type(ct.eb) is float
    assert max_error(x, ct.decompress()) <= float(eb)
    assert codec.absolute_bound(x, eb, "rel") == pytest.approx(float(eb) * float(x.max() - x.min()))


@pytest.mark.parametrize("eb", [True, False, np.bool_(True), torch.tensor(True), torch.tensor([0.1]),
                                torch.tensor([[0.1]]), np.array([0.1]), torch.tensor(0.1 + 0j), 1 + 0j, "0.1", b"0.1",
                                None, [0.1], {}, object(), np.float32("nan"), torch.tensor(float("inf")),
                                torch.tensor(-0.1), np.float64(0.0), 10**400, 10**5000, fractions.Fraction(10**400)],
                         ids=lambda v: type(v).__name__)
def test_what_is_not_a_bound_stays_invalid(eb):
    for name in codec.CODECS:
        with pytest.raises(InvalidBoundError):
            codec.compress(torch.randn(4, 4), eb, codec=name)
        with pytest.raises(InvalidBoundError):
            codec.absolute_bound(torch.randn(4, 4), eb, "meanabs")


@pytest.mark.parametrize("name", codec.CODECS)
@pytest.mark.parametrize("dtype", [torch.int8, torch.uint8, torch.int32, torch.int64, torch.bool, torch.complex64,
                                   np.float32, "float32", float])
def test_decompress_into_a_non_float_dtype_is_refused(name, dtype):
    ct = codec.compress(torch.randn(8, 8), 0.01, codec=name)
    with pytest.raises(UnsupportedDtypeError, match="dtype"):
        ct.decompress(dtype=dtype)


@pytest.mark.parametrize("name", codec.CODECS)
def test_decompress_into_wider_float_dtypes_still_works(name):
    x = torch.randn(8, 8).to(torch.bfloat16)
    ct = codec.compress(x, 0.01, codec=name)
    for dtype in (torch.float32, torch.float64):
        y = ct.decompress(dtype=dtype)
        assert y.dtype == dtype and max_error(x, y) <= 0.01


@pytest.mark.parametrize("budget", ["1e400", "1e400GiB", 10**30, 10**400, 10**5000, float("inf"), float("-inf"),
                                    float("nan"), "inf", "nan", "9" * 400, "1000000TiB", MAX_BUDGET + 1, 2**64,
                                    np.float64(1e300), np.uint64(2**64 - 1), fractions.Fraction(10**400), 1e20],
                         ids=lambda v: type(v).__name__)
def test_giant_budgets_are_a_budget_error(budget):
    with pytest.raises(BudgetError):
        parse_budget(budget)


@pytest.mark.parametrize("budget", [True, np.bool_(False), 0, -1, 0.5, "0", "", "six", "6 GiBs", None, [1], b"1"],
                         ids=repr)
def test_budgets_that_mean_nothing_are_a_budget_error(budget):
    with pytest.raises(BudgetError):
        parse_budget(budget)


def test_sane_budgets_still_parse():
    assert parse_budget("6GiB") == 6 * 2**30
    assert parse_budget(" 512 MiB ") == 512 * 2**20
    assert parse_budget(np.int64(4096)) == 4096
    assert parse_budget(np.float32(4096.0)) == 4096
    assert parse_budget(MAX_BUDGET) == MAX_BUDGET
    assert parse_budget("1PiB".replace("PiB", "TiB")) == 2**40
