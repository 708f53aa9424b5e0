"""MyPT's fp32 decoding kernel (mypt.kernels) against torch's product, and where it steps aside."""

from __future__ import annotations

import pytest
import torch

from mypt import kernels


@pytest.mark.parametrize("rows", [1, 2, kernels.MAX_ROWS])
@pytest.mark.parametrize("out_in", [(37, 33), (64, 96), (130, 768), (5, 7)])
def test_fp32_linear_equals_torch(rows: int, out_in: tuple[int, int], monkeypatch: pytest.MonkeyPatch) -> None:
    """Widths that are and are not a multiple of the kernel's 32 values a step."""
    monkeypatch.setattr(kernels, "MIN_WEIGHTS", 1)  # small matrices too (torch's product is faster for them)
    torch.manual_seed(rows)
    w, x = torch.randn(*out_in), torch.randn(rows, 1, out_in[1])
    y = kernels.fp32_linear(x, w)
    assert y is not None and y.shape == (rows, 1, out_in[0])
    torch.testing.assert_close(y, torch.nn.functional.linear(x, w), atol=1e-4, rtol=1e-5)


def test_fp32_linear_steps_aside_where_it_does_not_apply() -> None:
    w, x = torch.randn(16, 32), torch.randn(2, 32)
    assert kernels.fp32_linear(x, w) is None  # a small matrix: torch's call costs less
    w = torch.randn(kernels.MIN_WEIGHTS // 32, 32)
    assert kernels.fp32_linear(x, w) is not None
    assert kernels.fp32_linear(torch.randn(kernels.MAX_ROWS + 1, 32), w) is None  # a prompt: torch's GEMM
    assert kernels.fp32_linear(x.bfloat16(), w) is None
    assert kernels.fp32_linear(x, w.t().contiguous().t()) is None  # not row-major
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert kernels.fp32_linear(x, w) is None


def test_decode_linear_is_nn_linear_with_its_bias_and_its_gradients(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(0)
    plain = torch.nn.Linear(40, 24)
    fast = torch.nn.Linear(40, 24)
    fast.load_state_dict(plain.state_dict())
    fast.__class__ = kernels.DecodeLinear
    monkeypatch.setattr(kernels, "MIN_WEIGHTS", 1)
    x = torch.randn(3, 40)
    with torch.no_grad():
        torch.testing.assert_close(fast(x), plain(x), atol=1e-5, rtol=1e-5)
    fast(x).sum().backward()  # with gradients on: torch's product, so it trains like nn.Linear
    plain(x).sum().backward()
    torch.testing.assert_close(fast.weight.grad, plain.weight.grad)
    assert fast.state_dict().keys() == plain.state_dict().keys()


@pytest.mark.parametrize("width", [1, 7, 8, 65, 50_257])
def test_greedy_rows_is_argmax_and_the_finite_check(width: int) -> None:
    """The first of equal maxima (ties, -0.0 against 0.0, a maximum in the tail past the last 8),
    rows read through a slice of wider rows, and any NaN or infinity marking its row."""
    torch.manual_seed(width)
    wide = torch.randn(9, width + 5)
    x = wide[:, :width]  # rows of `width` values, `width + 5` apart
    x[1] = 0.5
    x[2, -1] = 9.0
    x[3] = -0.0
    x[3, width // 2] = 0.0
    x[4, 0] = float("nan")
    x[5, -1] = float("inf")
    x[6, width // 3] = float("-inf")
    x[7, (2 * width) // 3:] = x[7].max() + 1
    index, finite = kernels.greedy_rows(x)
    expected_finite = torch.isfinite(x).all(1)
    assert finite == expected_finite.tolist() and finite[4:7] == [False] * 3
    rows = [i for i in range(9) if finite[i]]
    assert [index[i] for i in rows] == x[rows].argmax(1).tolist()
    assert index[1] == 0 and index[2] == width - 1 and index[3] == 0
