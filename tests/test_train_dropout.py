"""llmcal.train.dropout: the CPU LoRA dropout draws the same Bernoulli masks as torch's, faster."""
from __future__ import annotations

import pytest
import torch

from llmcal.train.dropout import CpuMaskDropout, use_cpu_mask_dropout

P = 0.05


def _dropped_share(out: torch.Tensor) -> float:
    return (out == 0).float().mean().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_keeps_each_element_with_probability_one_minus_p_and_rescales(dtype):
    torch.manual_seed(0)
    x = torch.ones(1000, 1000, dtype=dtype)
    out = CpuMaskDropout(P).train()(x)
    assert out.dtype == dtype and out.shape == x.shape
    sigma = (P * (1 - P) / x.numel()) ** 0.5
    assert abs(_dropped_share(out) - P) < 5 * sigma  # 0.05 rounded to 3277/65536 is within 1e-5 of it
    kept = out[out != 0]
    assert torch.all(kept == torch.tensor(1 / (1 - P), dtype=dtype))
    # torch's own dropout on the same tensor: the same share, within the same noise
    reference = torch.nn.functional.dropout(x.float(), P, training=True)
    assert abs(_dropped_share(out) - _dropped_share(reference)) < 7 * sigma


def test_the_four_draws_of_one_random_word_are_independent():
    torch.manual_seed(1)
    dropped = CpuMaskDropout(0.5).train()(torch.ones(400_000)) == 0
    lanes = dropped.view(-1, 4).float()  # the four 16-bit draws of each 64-bit word
    both = (lanes[:, :, None] * lanes[:, None, :]).mean(0)  # P(lane i and lane j dropped)
    off_diagonal = both[~torch.eye(4, dtype=torch.bool)]
    assert torch.all((off_diagonal - 0.25).abs() < 0.01)  # 0.5 * 0.5; sigma ~0.0014 over 100k words
    assert torch.all((lanes.mean(0) - 0.5).abs() < 0.01)


def test_gradient_is_the_mask_and_eval_is_the_identity():
    torch.manual_seed(2)
    x = torch.ones(64, 32, requires_grad=True)
    drop = CpuMaskDropout(P).train()
    out = drop(x)
    out.sum().backward()
    assert torch.equal(x.grad, out.detach())  # d(out)/dx is the scaled mask, which x = 1 shows
    y = torch.randn(8, 8)
    assert torch.equal(drop.eval()(y), y)
    assert torch.equal(CpuMaskDropout(0.0).train()(y), y)


def test_seeded_masks_repeat():
    x = torch.ones(128, 128)
    drop = CpuMaskDropout(P).train()
    torch.manual_seed(3)
    a = drop(x)
    torch.manual_seed(3)
    assert torch.equal(a, drop(x))
    assert not torch.equal(a, drop(x))


def test_replaces_the_lora_dropouts_of_a_peft_model(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    def lora(p):
        model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
        return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=p, target_modules="all-linear",
                                                task_type="CAUSAL_LM"))

    model = lora(P)
    n = sum(1 for m in model.modules() if type(m) is torch.nn.Dropout)
    assert n > 0 and use_cpu_mask_dropout(model) == n
    assert not any(type(m) is torch.nn.Dropout for m in model.modules())
    assert sum(isinstance(m, CpuMaskDropout) and m.p == P for m in model.modules()) == n
    assert use_cpu_mask_dropout(lora(0.0)) == 0  # peft uses nn.Identity when there is no dropout
