import torch
import torch.nn.functional as F

from fmkit.train.loss import IGNORE_INDEX, fused_linear_cross_entropy


def test_fused_loss_and_gradients_match_plain_cross_entropy():
    torch.manual_seed(0)
    hidden = torch.randn(2, 37, 16, requires_grad=True)
    weight = torch.randn(101, 16, requires_grad=True)
    targets = torch.randint(0, 101, (2, 37))
    targets[0, :5] = IGNORE_INDEX
    loss = fused_linear_cross_entropy(hidden, weight, targets, chunk_rows=10)
    (loss * 3).backward()
    h2, w2 = hidden.detach().clone().requires_grad_(), weight.detach().clone().requires_grad_()
    ref = F.cross_entropy((h2 @ w2.t()).flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)
    (ref * 3).backward()
    torch.testing.assert_close(loss, ref)
    torch.testing.assert_close(hidden.grad, h2.grad)
    torch.testing.assert_close(weight.grad, w2.grad)


def test_fused_loss_uses_the_autocast_dtype_for_matmuls():
    torch.manual_seed(0)
    hidden, weight = torch.randn(8, 16), torch.randn(50, 16)
    targets = torch.randint(0, 50, (8,))
    exact = fused_linear_cross_entropy(hidden, weight, targets)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = fused_linear_cross_entropy(hidden, weight, targets)
    assert low.dtype == torch.float32 and low != exact and abs(float(low - exact)) < 0.1
