"""The chunked training loss equals F.cross_entropy on fp32 logits, forward and backward, at any chunk size."""

import pytest
import torch
import torch.nn.functional as F

from framework.trainer.loss import chunked_cross_entropy, lm_loss


def reference(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("chunk", [1, 5, 7, 64])
def test_chunked_loss_equals_reference_forward_and_backward(dtype, chunk):
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 7, 50, generator=gen) * 4).to(dtype)
    targets = torch.randint(0, 50, (3, 7), generator=gen)
    targets[1, 2] = targets[2, 6] = -100  # ignored positions, as F.cross_entropy's default

    a = logits.clone().requires_grad_()
    want = reference(a, targets)
    want.backward()
    b = logits.clone().requires_grad_()
    got = chunked_cross_entropy(b, targets, chunk=chunk)
    got.backward()

    assert got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert b.grad.dtype == dtype
    tol = {"rtol": 1e-6, "atol": 1e-7} if dtype == torch.float32 else {"rtol": 0, "atol": 0}
    if dtype == torch.bfloat16:  # the fp32 gradients round to bf16: at most one ulp apart
        assert ((b.grad.float() - a.grad.float()).abs() <= a.grad.float().abs() * 2**-7 + 1e-9).all()
    else:
        torch.testing.assert_close(b.grad, a.grad, **tol)
    assert torch.count_nonzero(b.grad[1, 2]) == 0  # an ignored position gets no gradient


def test_loss_scales_with_the_upstream_gradient_and_works_without_grad():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 4, 11, generator=gen, requires_grad=True)
    targets = torch.randint(0, 11, (2, 4), generator=gen)
    (lm_loss(logits, targets) * 3.0).backward()
    ref = logits.detach().clone().requires_grad_()
    (reference(ref, targets) * 3.0).backward()
    torch.testing.assert_close(logits.grad, ref.grad, rtol=1e-6, atol=1e-7)
    with torch.no_grad():
        torch.testing.assert_close(lm_loss(logits, targets), reference(logits, targets), rtol=1e-6, atol=1e-6)


def test_bad_chunk_is_refused():
    with pytest.raises(ValueError, match="chunk=0"):
        chunked_cross_entropy(torch.zeros(1, 2, 3), torch.zeros(1, 2, dtype=torch.long), chunk=0)
