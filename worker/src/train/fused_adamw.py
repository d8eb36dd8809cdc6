"""Regenerates `fused_adamw.torchscript`, the TorchScript bridge to `torch._fused_adamw_`.

tch 0.24 does not bind the `_fused_adam*` ops (its generator excludes them), so
the worker reaches libtorch's fused AdamW kernel through this tiny scripted
module, embedded in the binary with `include_bytes!`. It holds code only, no
weights. Regenerate with the PyTorch that matches the linked libtorch:

    cd worker/src/train && ../../../.venv/bin/python fused_adamw.py
"""
from typing import List

import torch


class FusedAdamW(torch.nn.Module):
    def forward(
        self,
        params: List[torch.Tensor],
        grads: List[torch.Tensor],
        exp_avgs: List[torch.Tensor],
        exp_avg_sqs: List[torch.Tensor],
        steps: List[torch.Tensor],
        lr: float,
        beta1: float,
        beta2: float,
        weight_decay: float,
        eps: float,
    ) -> int:
        # `steps` already hold the new step number: like torch.optim.AdamW,
        # the caller increments them before the kernel runs.
        torch._fused_adamw_(
            params, grads, exp_avgs, exp_avg_sqs, [], steps,
            amsgrad=False, lr=lr, beta1=beta1, beta2=beta2,
            weight_decay=weight_decay, eps=eps, maximize=False,
        )
        return 0


if __name__ == "__main__":
    torch.jit.script(FusedAdamW()).save("fused_adamw.torchscript")
