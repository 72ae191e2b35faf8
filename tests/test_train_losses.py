"""llmcal.train losses, batches and the training forward (no Trainer here: fast)."""
from __future__ import annotations

import math

import pytest
import torch

from llmcal.train.losses import (OFFICIAL_SCALE, OfficialRcftLoss, RcftLoss, answer_ce_loss, bins_of, nonmax_targets,
                                 official_bins, official_calibration_loss)

NAN = float("nan")


def _logits(rows):
    """Logits whose softmax is each row (0 means a padded option: -inf)."""
    return torch.tensor([[math.log(p) if p > 0 else float("-inf") for p in r] for r in rows], dtype=torch.float32)


ROWS = [
    [0.92, 0.04, 0.03, 0.01],  # conf 0.92 -> bin 9
    [0.20, 0.55, 0.25, 0.0],  # K=3 (last slot padded), conf 0.55 -> bin 5
    [0.30, 0.30, 0.40, 0.0],  # conf 0.40 -> bin 4: no estimate there, skipped
]
MASK = torch.tensor([[True] * 4, [True, True, True, False], [True, True, True, False]])
TARGETS = torch.tensor([NAN] * 5 + [0.5] + [NAN] * 3 + [0.8])  # a_5 = 0.5, a_9 = 0.8


def _proportional_term(p, a):
    top = max(range(len(p)), key=lambda j: p[j])
    others = [p[j] for j in range(len(p)) if j != top and p[j] > 0]
    s = sum(others)
    return (p[top] - a) ** 2 + sum((q - (1 - a) * q / s) ** 2 for q in others)


def _tanh_term(p, a):
    # the official code (not_max_target_confidence): gamma = ln 3 / q2 / (1 - a),
    # alpha = (1 - a) / (T + m), target = alpha * tanh(gamma q) + alpha
    top = max(range(len(p)), key=lambda j: p[j])
    others = [p[j] for j in range(len(p)) if j != top and p[j] > 0]
    gamma = math.log(3) / max(others) / (1 - a)
    T = sum(math.tanh(gamma * q) for q in others)
    alpha = (1 - a) / (T + len(others))
    return (p[top] - a) ** 2 + sum((q - (alpha * math.tanh(gamma * q) + alpha)) ** 2 for q in others)


def test_rcft_loss_hand_computed_proportional():
    # row 0: (0.92-0.8)^2 + (0.04-0.1)^2 + (0.03-0.075)^2 + (0.01-0.025)^2 = 0.0144 + 0.00585
    assert _proportional_term(ROWS[0], 0.8) == pytest.approx(0.0144 + 0.00585)
    expected = (_proportional_term(ROWS[0], 0.8) + _proportional_term(ROWS[1][:3], 0.5)) / 2
    loss = RcftLoss(10, "proportional")(_logits(ROWS), TARGETS, MASK)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_rcft_loss_hand_computed_tanh():
    expected = (_tanh_term(ROWS[0], 0.8) + _tanh_term(ROWS[1][:3], 0.5)) / 2
    loss = RcftLoss(10, "tanh")(_logits(ROWS), TARGETS, MASK)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert not math.isclose(expected, (_proportional_term(ROWS[0], 0.8) + _proportional_term(ROWS[1][:3], 0.5)) / 2)


@pytest.mark.parametrize("rule", ["proportional", "tanh"])
def test_nonmax_targets_share_one_minus_accuracy(rule):
    q = torch.tensor([[0.7, 0.2, 0.06, 0.04], [0.5, 0.5, 0.0, 0.0]])
    others = torch.tensor([[False, True, True, True], [False, True, False, False]])
    a = torch.tensor([0.6, 0.9])
    t = nonmax_targets(q, others, a, rule)
    assert t.sum(dim=1).tolist() == pytest.approx([0.4, 0.1], abs=1e-6)
    assert (t[~others] == 0).all()
    assert t[0, 1] > t[0, 2] > t[0, 3]  # more probable options get more of the mass
    ones = nonmax_targets(q, others, torch.tensor([1.0, 1.0]), rule)
    assert torch.all(ones == 0)  # a = 1: nothing left to share (tanh: no division by zero)


def test_gradient_flows_only_where_it_should():
    logits = _logits(ROWS).clone().requires_grad_(True)
    targets = TARGETS.clone().requires_grad_(True)
    loss = RcftLoss(10, "proportional")(logits, targets, MASK)
    loss.backward()
    assert targets.grad is None  # targets are constants of the M-step
    g = logits.grad
    assert torch.all(g[2] == 0)  # a question in an empty bin contributes nothing
    assert torch.all(g[1, 3] == 0)  # nor does a padded option slot
    assert torch.all(torch.isfinite(g)) and g[0].abs().sum() > 0 and g[1, :3].abs().sum() > 0


def test_all_bins_empty_gives_zero_loss_with_a_graph():
    logits = _logits(ROWS).clone().requires_grad_(True)
    loss = RcftLoss(10)(logits, torch.full((10,), NAN), MASK)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.all(logits.grad == 0)


# ---- the official variant (the authors' Custom_Trainer.compute_calibration_loss) ----------------
def _official_term(p, a):
    """By hand, the authors' way: sort the probabilities, the three after the largest are the non-max ones;
    a = 1 gives targets 0 (their alpha = beta = 0)."""
    srt = sorted(p, reverse=True)
    c, rest = srt[0], srt[1:]
    if a == 1.0:
        targets = [0.0] * len(rest)
    else:
        gamma = math.log(3) / rest[0] * (1 / (1 - a))
        T = sum(math.tanh(gamma * q) for q in rest)
        alpha = (1 - a) / (T + 3)
        targets = [alpha * math.tanh(gamma * q) + alpha for q in rest]
    return (c - a) ** 2 + sum((q - t) ** 2 for q, t in zip(rest, targets))


OFFICIAL_ROWS = [
    [0.72, 0.13, 0.10, 0.05],  # conf 0.72 -> bin 7
    [0.10, 0.74, 0.10, 0.06],  # conf 0.74 -> bin 7 (with the row above: both divided by N_7)
    [0.05, 0.05, 0.35, 0.55],  # conf 0.55 -> bin 5, a_5 = 1: targets 0
    [0.95, 0.02, 0.02, 0.01],  # conf 0.95 -> bin 9, the top bin
    [0.40, 0.30, 0.20, 0.10],  # conf 0.40 -> bin 4: N_4 = 0 in the E-step, skipped
]
OFFICIAL_ACC = torch.tensor([NAN, NAN, 0.3, 0.2, NAN, 1.0, 0.5, 0.6, 0.7, 0.9])
OFFICIAL_COUNT = torch.tensor([0, 0, 5, 10, 0, 8, 20, 4, 30, 12], dtype=torch.float32)


def test_official_bins_are_the_authors_bucketize_right_true_indexed_k_minus_1():
    conf = torch.tensor([0.0, 0.05, 0.0999, 0.1, 0.25, 0.3, 0.55, 0.8999, 0.9, 0.97, 1.0], dtype=torch.float64)
    # torch.bucketize(c, [0, .1, ..., .9], right=True) is k in 1..10 with edges[k-1] <= c < edges[k]
    edges = torch.tensor([0.0, 0.1, 0.2, 0.30000000000000004, 0.4, 0.5, 0.6000000000000001, 0.7000000000000001,
                          0.8, 0.9], dtype=torch.float64)  # numpy.linspace(0, 1, 10, endpoint=False)
    k = torch.bucketize(conf, edges, right=True)
    # (0.3 lies below its edge 3 * 0.1 = 0.30000000000000004: float rounding at an edge)
    assert k.tolist() == [1, 1, 1, 2, 3, 3, 6, 9, 10, 10, 10]
    # their lists hold bin k at position k - 1: an edge belongs to the bin above it, 1.0 to the top bin
    assert official_bins(conf).tolist() == [0, 0, 0, 1, 2, 2, 5, 8, 9, 9, 9] == (k - 1).tolist()
    away = torch.tensor([0.05, 0.25, 0.55, 0.97])  # away from the edges, llmcal's own bins
    assert official_bins(away).tolist() == bins_of(away, 10).tolist()
    # at an edge, float rounding decides: float32 0.9 is 0.89999998, below the float64 edge 0.9
    assert official_bins(torch.tensor([0.9])).tolist() == [8]


def test_official_calibration_loss_hand_computed():
    logits = _logits(OFFICIAL_ROWS)
    bin7 = (_official_term(OFFICIAL_ROWS[0], 0.6) + _official_term(OFFICIAL_ROWS[1], 0.6)) / 4  # N_7 = 4
    bin5 = _official_term(OFFICIAL_ROWS[2], 1.0) / 8
    top = _official_term(OFFICIAL_ROWS[3], 0.9) / 12
    assert bin5 == pytest.approx(((0.55 - 1) ** 2 + 0.35 ** 2 + 0.05 ** 2 + 0.05 ** 2) / 8)  # a = 1: targets 0
    r = official_calibration_loss(logits, OFFICIAL_ACC, OFFICIAL_COUNT)
    assert r.item() == pytest.approx(bin7 + bin5 + top, rel=1e-5)
    # the authors' loop visits bins 0..8 only: the top bin's question drops out
    r9 = official_calibration_loss(logits, OFFICIAL_ACC, OFFICIAL_COUNT, skip_top_bin=True)
    assert r9.item() == pytest.approx(bin7 + bin5, rel=1e-5)
    # a sum over the bin divided by the training set's N_k, not a mean over the batch: doubling N_7 halves it
    count = OFFICIAL_COUNT.clone()
    count[7] = 8
    assert official_calibration_loss(logits, OFFICIAL_ACC, count).item() == pytest.approx(bin7 / 2 + bin5 + top,
                                                                                          rel=1e-5)


def test_official_targets_carry_gradient_unlike_llmcals_tanh_rule():
    row = [[0.70, 0.15, 0.10, 0.05]]
    acc, count = torch.full((10,), 0.6), torch.ones(10)
    logits = _logits(row).requires_grad_(True)
    official_calibration_loss(logits, acc, count).backward()
    g_official = logits.grad.clone()
    logits.grad = None
    RcftLoss(10, "tanh")(logits, acc).backward()  # the same term, targets detached
    g_detached = logits.grad
    assert RcftLoss(10, "tanh")(logits, acc).item() == pytest.approx(
        official_calibration_loss(logits, acc, count).item(), rel=1e-6)  # same value for one question, N = 1
    assert torch.all(torch.isfinite(g_official)) and not torch.allclose(g_official, g_detached, atol=1e-6)
    # by finite differences: the official gradient is the derivative of the official value
    eps, z = 1e-3, _logits(row).double()
    for j in range(4):
        up, dn = z.clone(), z.clone()
        up[0, j] += eps
        dn[0, j] -= eps
        fd = (official_calibration_loss(up, acc.double(), count) - official_calibration_loss(dn, acc.double(), count))
        assert fd.item() / (2 * eps) == pytest.approx(g_official[0, j].item(), rel=2e-3, abs=1e-6)


def test_official_loss_skips_empty_bins_and_keeps_a_graph():
    logits = _logits([OFFICIAL_ROWS[4]]).requires_grad_(True)  # bin 4: N_4 = 0
    r = official_calibration_loss(logits, OFFICIAL_ACC, OFFICIAL_COUNT)
    assert r.item() == 0.0
    r.backward()
    assert torch.all(logits.grad == 0)
    logits = _logits(OFFICIAL_ROWS).requires_grad_(True)
    official_calibration_loss(logits, OFFICIAL_ACC, OFFICIAL_COUNT).backward()
    assert torch.all(torch.isfinite(logits.grad)) and torch.all(logits.grad[4] == 0)
    with pytest.raises(ValueError, match="bins"):
        official_calibration_loss(logits, OFFICIAL_ACC, torch.ones(9))


def test_official_mix_weighs_sft_and_r_as_the_authors_do():
    from llmcal.train.state import TrainState

    st = TrainState.initial("rcft", 1.0, 10)
    st.set_targets([None if math.isnan(a) else a for a in OFFICIAL_ACC.tolist()], "once:0", {},
                   counts=[int(c) for c in OFFICIAL_COUNT.tolist()])
    assert TrainState.from_dict(st.to_dict()).counts == st.counts  # the counts travel with the checkpoint
    logits, sft = _logits(OFFICIAL_ROWS), torch.tensor(2.0)
    r = official_calibration_loss(logits, OFFICIAL_ACC, OFFICIAL_COUNT).item()
    for alpha in (0.0, 0.5, 1.0):
        total = OfficialRcftLoss(alpha).total(sft, logits, st)
        assert total.item() == pytest.approx((1 - alpha) * 2.0 + alpha * 1e-3 * r, rel=1e-6)
    assert OFFICIAL_SCALE == 1e-3


def test_answer_ce_loss_is_full_vocabulary_cross_entropy():
    torch.manual_seed(0)
    z = torch.randn(3, 50)
    y = torch.tensor([4, 7, -100])
    want = -(torch.log_softmax(z, -1)[0, 4] + torch.log_softmax(z, -1)[1, 7]) / 2
    assert answer_ce_loss(z, y).item() == pytest.approx(want.item(), rel=1e-6)


# ---- batches and the training forward ------------------------------------------------------
@pytest.fixture(scope="module")
def encoded(tiny_tokenizer):
    from llmcal.data import load_dataset
    from llmcal.prompts import encode_questions

    qs = load_dataset("synthetic:facts?n=6&k=4").questions
    return encode_questions(qs, tiny_tokenizer, "plain")


def test_collator_targets_answer_and_explanation(encoded, tiny_tokenizer):
    from llmcal.train.collator import IGNORE, McqCollator, build_examples

    plain = McqCollator(0)(build_examples(encoded, tiny_tokenizer))
    for r, e in enumerate(encoded):
        n = len(e.input_ids)
        assert plain["answer_pos"][r] == n - 1
        assert plain["targets"][r, n - 1] == e.letter_ids[e.question.answer]
        assert (plain["targets"][r] != IGNORE).sum() == 1
        assert plain["input_ids"][r, :n].tolist() == list(e.input_ids)
    full = McqCollator(0)(build_examples(encoded, tiny_tokenizer, include_explanation=True))
    e = encoded[0]
    n = len(e.input_ids)
    assert full["input_ids"][0, n] == e.letter_ids[e.question.answer]  # the letter is read, then the explanation
    assert (full["targets"][0] != IGNORE).sum() > 3
    assert full["targets"][0, n - 1] == e.letter_ids[e.question.answer]


def test_training_forward_matches_the_scoring_engine(encoded, tiny_tokenizer, tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from llmcal.scoring import collate, option_logits
    from llmcal.train.collator import McqCollator, build_examples
    from llmcal.train.trainer import answer_forward

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM",
                                             init_lora_weights=False))  # a non-zero adapter
    model.eval()
    batch = McqCollator(0)(build_examples(encoded, tiny_tokenizer))
    with torch.no_grad():
        out = answer_forward(model, batch)
        ids, mask, letters, lmask = collate(encoded, 0, "cpu")
        ref = option_logits(model, ids, mask, letters, lmask)
    assert torch.allclose(out.letter_logits, ref, atol=1e-4)
    full = model(input_ids=ids, attention_mask=mask).logits
    last = mask.sum(1) - 1
    want = answer_ce_loss(full[torch.arange(len(encoded)), last], batch["targets"][torch.arange(len(encoded)), last])
    assert out.sft_loss.item() == pytest.approx(want.item(), rel=1e-5)


def test_right_padded_batches_run_without_an_attention_mask(encoded, tiny_tokenizer, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    from llmcal.train.collator import McqCollator, build_examples
    from llmcal.train.trainer import answer_forward

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    seen = []
    model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw.get("attention_mask")), with_kwargs=True)
    batch = McqCollator(0)(build_examples(encoded, tiny_tokenizer))
    assert (batch["attention_mask"] == 0).any()  # there is padding, on the right
    with torch.no_grad():
        answer_forward(model, batch)
        left = dict(batch, attention_mask=batch["attention_mask"].flip(1))  # not right-padded: the mask is kept
        answer_forward(model, left)
    assert seen[0] is None and seen[1] is not None


def _lora_model(tiny_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                                            task_type="CAUSAL_LM", init_lora_weights=False))


def _varied(encoded, tiny_tokenizer, include_explanation=False):
    from llmcal.train.collator import build_examples

    examples = build_examples(encoded, tiny_tokenizer, include_explanation)
    # questions of very different lengths: a longer prompt in front of some (the answer stays last)
    return [dict(e, input_ids=e["input_ids"] * (1 + i % 3), targets=[-100] * (len(e["input_ids"]) * (i % 3))
                 + e["targets"], answer_pos=e["answer_pos"] + len(e["input_ids"]) * (i % 3))
            for i, e in enumerate(examples)]


def test_packed_batch_layout(encoded, tiny_tokenizer):
    from llmcal.train.collator import IGNORE, McqCollator

    examples = _varied(encoded, tiny_tokenizer)
    packed = McqCollator(0, packed=True)(examples)
    padded = McqCollator(0)(examples)
    assert "attention_mask" not in packed and packed["input_ids"].shape == (1, sum(len(e["input_ids"]) for e in examples))
    start = 0
    for r, e in enumerate(examples):
        n = len(e["input_ids"])
        assert packed["input_ids"][0, start:start + n].tolist() == e["input_ids"]
        assert packed["position_ids"][0, start:start + n].tolist() == list(range(n))  # restart per question
        assert packed["answer_pos"][r] == start + e["answer_pos"]
        assert packed["targets"][0, packed["answer_pos"][r]] == padded["targets"][r, padded["answer_pos"][r]] != IGNORE
        start += n
    for key in ("letter_ids", "letter_mask", "answer"):
        assert torch.equal(packed[key], padded[key])


@pytest.mark.parametrize("include_explanation", [False, True])
def test_packed_batches_train_exactly_like_padded_ones(encoded, tiny_tokenizer, tiny_model_dir, include_explanation):
    """The same loss, letter logits and gradients: each packed question sees only itself."""
    from llmcal.train.collator import McqCollator
    from llmcal.train.trainer import answer_forward, packs_questions

    examples = _varied(encoded, tiny_tokenizer, include_explanation)
    model = _lora_model(tiny_model_dir).train()
    assert packs_questions(model)
    results = {}
    for packed in (False, True):
        model.zero_grad()
        out = answer_forward(model, McqCollator(0, packed=packed)(examples))
        out.sft_loss.backward()
        grads = torch.cat([p.grad.reshape(-1) for _, p in sorted(model.named_parameters()) if p.requires_grad])
        results[packed] = (out.sft_loss.item(), out.letter_logits.detach(), grads)
    (loss_a, letters_a, grads_a), (loss_b, letters_b, grads_b) = results[False], results[True]
    assert loss_b == pytest.approx(loss_a, rel=1e-5)
    assert torch.allclose(letters_b, letters_a, atol=1e-4)
    assert torch.allclose(grads_b, grads_a, rtol=1e-4, atol=1e-6)
    # the check can fail: the same row with positions that run on lets the questions see each other
    batch = McqCollator(0, packed=True)(examples)
    run_on = dict(batch, position_ids=torch.arange(batch["input_ids"].shape[1])[None])
    with torch.no_grad():
        leaked = answer_forward(model, run_on).letter_logits
    assert not torch.allclose(leaked[1:], letters_a[1:], atol=1e-2)


def test_packing_needs_transformers_mask_builder(tiny_model_dir):
    from llmcal.train.trainer import packs_questions

    class OwnMask(torch.nn.Module):  # a model with its own mask code (this test module has no create_causal_mask)
        def forward(self, input_ids, position_ids=None):
            return input_ids

    assert packs_questions(_lora_model(tiny_model_dir))
    assert not packs_questions(OwnMask())


def _bf16_lora(tiny_model_dir, dtype):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=dtype)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear",
                                             task_type="CAUSAL_LM", init_lora_weights=False))
    return model.train()


def test_cpu_bf16_step_runs_the_adapters_in_bf16_and_matches_float32(encoded, tiny_tokenizer, tiny_model_dir):
    from peft.tuners.tuners_utils import BaseTunerLayer

    from llmcal.train.collator import McqCollator, build_examples
    from llmcal.train.trainer import answer_forward, training_precision

    batch = McqCollator(0)(build_examples(encoded, tiny_tokenizer))
    grads = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = _bf16_lora(tiny_model_dir, dtype)
        assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)  # fp32 adapters
        out_dtypes = []
        layer = next(m for m in model.modules() if isinstance(m, BaseTunerLayer))
        layer.lora_A["default"].register_forward_hook(lambda m, a, o: out_dtypes.append(o.dtype))
        with training_precision(model):
            casting = [m.cast_input_dtype_enabled for m in model.modules() if isinstance(m, BaseTunerLayer)]
            loss = answer_forward(model, batch).sft_loss
        loss.backward()
        assert all(m.cast_input_dtype_enabled for m in model.modules() if isinstance(m, BaseTunerLayer))  # restored
        if dtype == torch.bfloat16:
            assert not any(casting) and out_dtypes == [torch.bfloat16]  # the adapter ran in bf16 on bf16 inputs
        else:
            assert all(casting) and out_dtypes == [torch.float32]  # nothing changes for a float32 model
        grads[dtype] = torch.cat([p.grad.float().reshape(-1) for n, p in sorted(model.named_parameters())
                                  if p.requires_grad])
        assert all(p.grad.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    a, b = grads[torch.float32], grads[torch.bfloat16]
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.99
    assert (a - b).norm() / a.norm() < 0.1


def test_group_by_length_batches_are_grouped_by_length(encoded, tiny_tokenizer, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM, TrainingArguments

    from llmcal.train.collator import ExampleDataset, LengthBucketSampler, McqCollator, build_examples
    from llmcal.train.losses import RcftLoss
    from llmcal.train.state import TrainState
    from llmcal.train.trainer import CalibrationTrainer

    examples = build_examples(encoded, tiny_tokenizer)
    # many examples of very different lengths
    examples = [dict(e, input_ids=e["input_ids"] * (1 + i % 5), targets=e["targets"] * (1 + i % 5))
                for i in range(40) for e in examples[:1]]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)

    def trainer(**kw):
        args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, use_cpu=True,
                                 report_to=[], remove_unused_columns=False, seed=0, **kw)
        return CalibrationTrainer(model=model, args=args, train_dataset=ExampleDataset(examples),
                                  data_collator=McqCollator(0), train_state=TrainState.initial("cft", 1.0, 10),
                                  rcft_loss=RcftLoss(10))

    def padding(order):
        lengths = [len(examples[i]["input_ids"]) for i in order]
        return sum(max(lengths[s:s + 4]) * len(lengths[s:s + 4]) - sum(lengths[s:s + 4]) for s in range(0, 40, 4))

    torch.manual_seed(0)
    assert not isinstance(trainer()._get_train_sampler(), LengthBucketSampler)  # random batches by default
    sampler = trainer(train_sampling_strategy="group_by_length")._get_train_sampler()
    assert isinstance(sampler, LengthBucketSampler)
    epoch1, epoch2 = list(sampler), list(sampler)
    assert sorted(epoch1) == list(range(40)) and epoch1 != epoch2  # every example once; epochs differ
    torch.manual_seed(0)
    shuffled = padding(torch.randperm(40).tolist())
    assert padding(epoch1) < shuffled / 2 and padding(epoch2) < shuffled / 2
    assert not isinstance(trainer(train_sampling_strategy="sequential")._get_train_sampler(), LengthBucketSampler)
