"""The batch-invariant sigmoid and softplus: torch's values to rounding, the exact derivative at 0, and an
element's value independent of the tensor's length."""

from __future__ import annotations

import numpy as np
import torch

from sim.engine.elementwise import sigmoid, softplus


def test_values_match_torch_to_rounding_and_never_overflow():
    x = torch.cat([torch.linspace(-40, 40, 801, dtype=torch.float64),
                   torch.tensor([-800.0, 800.0, 0.0], dtype=torch.float64)])
    # a few ulp: the forms differ from torch's kernels only in the order of the same few float64 operations
    torch.testing.assert_close(sigmoid(x), torch.sigmoid(x), rtol=1e-14, atol=0)
    # torch's softplus returns x itself above x = 20; numpy's logaddexp(0, x) is the exact-form reference
    torch.testing.assert_close(softplus(x), torch.from_numpy(np.logaddexp(0.0, x.numpy())), rtol=1e-14, atol=0)
    assert torch.isfinite(softplus(x)).all() and torch.isfinite(sigmoid(x)).all()


def test_the_derivative_of_softplus_is_the_sigmoid_everywhere_including_zero():
    x = torch.tensor([-30.0, -1.0, 0.0, 1.0, 30.0], dtype=torch.float64, requires_grad=True)
    softplus(x).sum().backward()
    torch.testing.assert_close(x.grad, torch.sigmoid(x.detach()), rtol=1e-14, atol=0)
    assert x.grad[2].item() == 0.5  # a clamp-based max(x, 0) + log1p(e^{−|x|}) would give 1 here


def test_an_element_has_the_same_bits_in_a_tensor_of_any_length():
    gen = torch.Generator().manual_seed(0)
    z = 10 * torch.randn(67, dtype=torch.float64, generator=gen)
    for f in (sigmoid, softplus):
        whole = f(z)
        for n in range(1, 67):
            assert torch.equal(f(z[:n]), whole[:n]), (f.__name__, n)
