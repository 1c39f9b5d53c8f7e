"""Cross-entropy over a large vocabulary without materialising the logits.

With a 50k vocabulary and a small model, the LM head and its loss are most of a training step. The plain path
builds fp32 logits (batch x seq x vocab), keeps them for backward and builds their gradient: several passes over
hundreds of MB. Here the head matmul, softmax and gradients are done chunk by chunk inside the forward pass (the
loss is the graph's last node, so its gradients are known then), and backward only scales them. The matmuls run in
the autocast dtype (bf16 is ~4x fp32 on these CPUs); the softmax and the loss are computed in fp32.
"""
from __future__ import annotations

import torch

IGNORE_INDEX = -100


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_rows, compute_dtype):
        # returns (mean loss, fraction of targets that are the arg-max): the max pass finds both
        n = hidden.shape[0]
        valid = targets != IGNORE_INDEX
        count = valid.sum().clamp(min=1)
        w = weight.to(compute_dtype)
        grad_hidden = torch.empty_like(hidden) if hidden.requires_grad else None
        grad_weight = torch.zeros_like(weight, dtype=torch.float32) if weight.requires_grad else None
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        correct = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, n, chunk_rows):
            h = hidden[start:start + chunk_rows].to(compute_dtype)
            t = targets[start:start + chunk_rows]
            ok = valid[start:start + chunk_rows]
            logits = (h @ w.t()).float()
            safe_t = torch.where(ok, t, 0)
            target_logit = logits.gather(1, safe_t[:, None]).squeeze(1)
            # One exp pass serves both the loss (log-sum-exp) and its gradient (softmax), in place.
            row_max, best = logits.max(dim=-1, keepdim=True)
            correct += ((best.squeeze(1) == t) & ok).sum()
            probs = logits.sub_(row_max).exp_()
            sums = probs.sum(dim=-1, keepdim=True)
            lse = (row_max + sums.log()).squeeze(1)
            total += ((lse - target_logit) * ok).sum()
            if grad_hidden is None and grad_weight is None:
                continue
            # d loss / d logits = (softmax - onehot) / count, zero on ignored rows: one scaling pass.
            scale = (ok / count)[:, None]
            probs.mul_(scale / sums)
            probs[torch.arange(len(t), device=t.device), safe_t] -= scale.squeeze(1)
            g = probs.to(compute_dtype)
            if grad_hidden is not None:
                grad_hidden[start:start + chunk_rows] = (g @ w).to(hidden.dtype)
            if grad_weight is not None:
                grad_weight += (g.t() @ h).float()
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.weight_dtype = weight.dtype
        accuracy = correct / count
        ctx.mark_non_differentiable(accuracy)
        return total / count, accuracy

    @staticmethod
    def backward(ctx, grad_output, _grad_accuracy):
        grad_hidden, grad_weight = ctx.saved_tensors
        gh = grad_hidden * grad_output if grad_hidden is not None else None
        gw = (grad_weight * grad_output).to(ctx.weight_dtype) if grad_weight is not None else None
        return gh, gw, None, None, None


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                               chunk_rows: int = 1024, accuracy: bool = False):
    """Mean cross-entropy of `hidden @ weight.T` against `targets` (IGNORE_INDEX skipped), chunked over rows;
    with `accuracy`, (loss, the fraction of targets that are the most likely token)."""
    hidden = hidden.reshape(-1, hidden.shape[-1])
    targets = targets.reshape(-1)
    if torch.is_autocast_enabled(hidden.device.type):
        compute_dtype = torch.get_autocast_dtype(hidden.device.type)
    else:
        compute_dtype = hidden.dtype
    with torch.autocast(hidden.device.type, enabled=False):
        loss, acc = _FusedLinearCrossEntropy.apply(hidden, weight, targets, chunk_rows, compute_dtype)
    return (loss, acc) if accuracy else loss
