"""LoRA dropout with cheap masks on CPU.

peft's LoRA layers drop their input with ``torch.nn.Dropout``.  On CPU that
draws one Bernoulli variate per activation (``bernoulli_``, one generator call
per element), divides and multiplies: in a bfloat16 training step of a
Qwen2.5-1.5B-shaped model it took about a fifth of the step
(``bench/profile_train.py``; bench/RESULTS.md, "Training").  No library has a faster CPU dropout, so this
one is written here: each 64-bit random integer from torch's generator gives
four 16-bit uniform draws, an element is kept when its draw is at or above
p * 65536 (rounded), and the 1 / (1 - p) scale is folded into the mask.  The
same Bernoulli(1 - p) mask, with p rounded to a multiple of 1/65536
(0.05 -> 0.0500031), from the same seeded generator, at a fraction of the
cost (``aten::bernoulli_`` 16% of that step, ``aten::random_`` 4%).  On other
devices ``torch.nn.Dropout`` runs as before.
"""
from __future__ import annotations

import torch
from torch import nn

_LEVELS = 65536  # 16-bit draws


class CpuMaskDropout(nn.Dropout):
    """``nn.Dropout`` whose CPU training mask comes from 16-bit uniform draws (module docstring)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0 or x.device.type != "cpu" or self.inplace:
            return super().forward(x)
        n = x.numel()
        words = torch.randint(-2 ** 63, 2 ** 63 - 1, ((n + 3) // 4,), dtype=torch.int64)
        draws = words.view(torch.int16)[:n].view(x.shape)  # uniform on [-32768, 32767]
        threshold = round(self.p * _LEVELS) - _LEVELS // 2
        keep = torch.tensor(1.0 / (1.0 - self.p), dtype=x.dtype)
        mask = torch.where(draws >= threshold, keep, torch.zeros((), dtype=x.dtype))
        return x * mask  # autograd keeps the mask for the backward: d(out)/dx = mask


def use_cpu_mask_dropout(model: nn.Module) -> int:
    """Replace the LoRA layers' ``nn.Dropout`` modules with ``CpuMaskDropout``; returns how many."""
    replaced = 0
    for module in model.modules():
        dropouts = getattr(module, "lora_dropout", None)
        if not isinstance(dropouts, nn.ModuleDict):
            continue
        for name, d in list(dropouts.items()):
            if type(d) is nn.Dropout and d.p > 0:
                dropouts[name] = CpuMaskDropout(d.p)
                replaced += 1
    return replaced
