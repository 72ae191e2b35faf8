"""The memory-lean training step (llmcal.train.trainer): vocabulary logits at the target positions only and
activation checkpointing give the losses and LoRA gradients of the plain computation."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F


@pytest.fixture(scope="module")
def examples(tiny_tokenizer):
    from llmcal.data import load_dataset
    from llmcal.prompts import encode_questions
    from llmcal.train.collator import build_examples

    encoded = encode_questions(load_dataset("synthetic:facts?n=6&k=4").questions, tiny_tokenizer, "plain")
    ex = build_examples(encoded, tiny_tokenizer, include_explanation=True)
    # questions of different lengths: a longer prompt in front of some (the answer stays where the prompt ends)
    return [dict(e, input_ids=e["input_ids"] * (1 + i % 3), targets=[-100] * (len(e["input_ids"]) * (i % 3))
                 + e["targets"], answer_pos=e["answer_pos"] + len(e["input_ids"]) * (i % 3))
            for i, e in enumerate(ex)]


def _model(tiny_model_dir, dtype=torch.float32, dropout=0.0):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from llmcal.train.dropout import use_cpu_mask_dropout

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=dtype)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, target_modules="all-linear",
                                             task_type="CAUSAL_LM", init_lora_weights=False))
    use_cpu_mask_dropout(model)
    return model.train()


def _grads(model):
    return torch.cat([p.grad.float().reshape(-1) for _, p in sorted(model.named_parameters()) if p.requires_grad])


def _full_logits_reference(model, batch):
    """Today's losses computed the long way: float32 logits over the whole vocabulary at every position."""
    kwargs = {"position_ids": batch["position_ids"]} if "position_ids" in batch else {
        "attention_mask": batch["attention_mask"]}
    logits = model(input_ids=batch["input_ids"], use_cache=False, **kwargs).logits.float()  # (B, L, V)
    sft = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch["targets"].reshape(-1), ignore_index=-100)
    rows = (torch.zeros_like(batch["answer_pos"]) if "position_ids" in batch
            else torch.arange(len(batch["answer_pos"])))
    letters = logits[rows, batch["answer_pos"]].gather(1, batch["letter_ids"])
    return sft, letters.masked_fill(~batch["letter_mask"], float("-inf"))


@pytest.mark.parametrize("packed", [False, True])
def test_logits_at_the_target_positions_give_the_full_vocabulary_losses_and_gradients(examples, tiny_model_dir,
                                                                                      packed):
    from llmcal.train.collator import McqCollator
    from llmcal.train.losses import RcftLoss
    from llmcal.train.trainer import answer_forward

    batch = McqCollator(0, packed=packed)(examples)
    model = _model(tiny_model_dir)
    targets = torch.tensor([float("nan")] * 5 + [0.4, 0.5, 0.6, 0.7, 0.8])  # bin accuracies: RCFT term on
    results = []
    for forward in (lambda: _full_logits_reference(model, batch),
                    lambda: (lambda o: (o.sft_loss, o.letter_logits))(answer_forward(model, batch))):
        model.zero_grad()
        sft, letters = forward()
        loss = sft + 1.0 * RcftLoss(10)(letters, targets, batch["letter_mask"])
        loss.backward()
        results.append((sft.item(), loss.item(), letters.detach(), _grads(model)))
    (sft_a, loss_a, let_a, g_a), (sft_b, loss_b, let_b, g_b) = results
    assert sft_b == pytest.approx(sft_a, rel=1e-5) and loss_b == pytest.approx(loss_a, rel=1e-5)
    assert torch.allclose(let_b, let_a, atol=1e-4)
    assert torch.allclose(g_b, g_a, rtol=1e-4, atol=1e-6)
    assert g_a.abs().sum() > 0


class SavedBytes:
    """Bytes autograd keeps for the backward pass (each storage once, parameters left out)."""

    def __init__(self, model):
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.seen, self.total = set(), 0

    def pack(self, t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in self.params and ptr not in self.seen:
            self.seen.add(ptr)
            self.total += t.untyped_storage().nbytes()
        return t

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, lambda t: t)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_checkpointed_layers_give_the_same_step_and_keep_less_for_backward(examples, tiny_model_dir, dtype):
    """With dropout on: the recomputation draws the masks of the forward; in bf16 it runs in the same precision."""
    from llmcal.train.collator import McqCollator
    from llmcal.train.trainer import answer_forward, checkpoint_layers, training_precision

    batch = McqCollator(0, packed=True)(examples)
    results = {}
    for checkpointed in (False, True):
        model = _model(tiny_model_dir, dtype=dtype, dropout=0.3)
        if checkpointed:
            checkpoint_layers(model)
        saved = SavedBytes(model)
        torch.manual_seed(1)
        with saved.hooks(), training_precision(model):
            out = answer_forward(model, batch)
        out.sft_loss.backward()
        results[checkpointed] = (out.sft_loss.item(), out.letter_logits.detach(), _grads(model), saved.total)
    (loss_a, let_a, g_a, saved_a), (loss_b, let_b, g_b, saved_b) = results[False], results[True]
    assert loss_b == loss_a and torch.equal(let_b, let_a)  # the same forward, bit for bit
    assert torch.allclose(g_b, g_a, rtol=1e-5, atol=1e-7)
    assert saved_b < 0.5 * saved_a
    # the check can fail: other dropout masks give other gradients
    model = _model(tiny_model_dir, dtype=dtype, dropout=0.3)
    torch.manual_seed(2)
    with training_precision(model):
        answer_forward(model, batch).sft_loss.backward()
    assert not torch.allclose(_grads(model), g_a, rtol=1e-3, atol=1e-5)


def test_gradient_checkpointing_argument_trains_the_same_model(examples, tiny_model_dir, tmp_path):
    from transformers import TrainingArguments

    from llmcal.train.collator import ExampleDataset, McqCollator
    from llmcal.train.losses import RcftLoss
    from llmcal.train.state import TrainState
    from llmcal.train.trainer import CalibrationTrainer

    runs = {}
    for checkpointed in (False, True):
        model = _model(tiny_model_dir, dtype=torch.bfloat16, dropout=0.1)
        args = TrainingArguments(output_dir=str(tmp_path / str(checkpointed)), per_device_train_batch_size=3,
                                 max_steps=2, learning_rate=1e-2, use_cpu=True, report_to=[], save_strategy="no",
                                 logging_steps=1, remove_unused_columns=False, seed=0, disable_tqdm=True,
                                 gradient_checkpointing=checkpointed)
        trainer = CalibrationTrainer(model=model, args=args, train_dataset=ExampleDataset(examples),
                                     data_collator=McqCollator(0, packed=True),
                                     train_state=TrainState.initial("cft", 1.0, 10), rcft_loss=RcftLoss(10))
        layers = [m for m in model.modules() if hasattr(m, "gradient_checkpointing") and hasattr(m, "self_attn")]
        assert all(m.gradient_checkpointing for m in layers) == checkpointed
        trainer.train()
        runs[checkpointed] = ([h["loss"] for h in trainer.state.log_history if "loss" in h],
                              torch.cat([p.detach().float().reshape(-1) for _, p in sorted(model.named_parameters())
                                         if p.requires_grad]))
    (loss_a, w_a), (loss_b, w_b) = runs[False], runs[True]
    assert len(loss_a) == 2 and loss_b == pytest.approx(loss_a, rel=1e-6)
    assert torch.allclose(w_b, w_a, rtol=1e-5, atol=1e-6)


DDP_SCRIPT = r'''
import hashlib, json, os, sys

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoTokenizer, TrainingArguments

from llmcal.data import load_dataset
from llmcal.models import load_model, resolve_model
from llmcal.prompts import encode_questions
from llmcal.train.collator import ExampleDataset, McqCollator, build_examples
from llmcal.train.losses import RcftLoss
from llmcal.train.state import TrainState
from llmcal.train.trainer import CalibrationTrainer

out, kept_dir, broadcast_dir = sys.argv[1:4]
rank = int(os.environ["RANK"])
tok = AutoTokenizer.from_pretrained(kept_dir)
examples = build_examples(encode_questions(load_dataset("synthetic:facts?n=8&k=4").questions, tok, "plain"), tok)


def train(model_dir, frozen_broadcast):
    args = TrainingArguments(output_dir=os.path.join(out, f"tmp{rank}"), per_device_train_batch_size=2, max_steps=2,
                             learning_rate=1e-2, use_cpu=True, report_to=[], save_strategy="no",
                             remove_unused_columns=False, seed=0, disable_tqdm=True, ddp_find_unused_parameters=False)
    assert str(args.device) == "cpu:0"  # what transformers gives a CPU process group, and run_finetune loads on
    torch.manual_seed(0)
    # as run_finetune loads it; the file's dtype, so the weights are the file's mapped pages
    model = load_model(resolve_model(model_dir), dtype="float32", device=str(args.device), trainable=True).model
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    trainer = CalibrationTrainer(model=model, args=args, train_dataset=ExampleDataset(examples),
                                 data_collator=McqCollator(tok.pad_token_id), train_state=TrainState.initial("cft", 1.0, 10),
                                 rcft_loss=RcftLoss(10))
    if frozen_broadcast:  # DDP's default: every parameter broadcast from rank 0 and copied back in place
        model._ddp_params_and_buffers_to_ignore = []
    trainer.train()
    trained = sorted((n, p.detach()) for n, p in model.named_parameters() if p.requires_grad)
    lora = torch.cat([p.reshape(-1) for _, p in trained])
    lora_b = max(float(p.abs().max()) for n, p in trained if "lora_B" in n)  # zero before training
    return model, hashlib.sha256(lora.numpy().tobytes()).hexdigest(), lora_b


def weights_mapping_kb(model_dir):
    """Rss and Anonymous (copied-on-write) kB of this process's mappings of the model's weights file."""
    path, rss, anon, current = os.path.realpath(os.path.join(model_dir, "model.safetensors")), 0, 0, False
    for line in open("/proc/self/smaps"):
        head = line.split()
        if "-" in head[0] and not head[0].endswith(":"):
            current = len(head) > 5 and os.path.realpath(head[5]) == path
        elif current and head[0] == "Rss:":
            rss += int(head[1])
        elif current and head[0] == "Anonymous:":
            anon += int(head[1])
    return {"rss_kb": rss, "anon_kb": anon}


kept = train(kept_dir, frozen_broadcast=False)
broadcast = train(broadcast_dir, frozen_broadcast=True)
with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
    json.dump({"kept": {**weights_mapping_kb(kept_dir), "lora": kept[1], "lora_b_max": kept[2]},
               "broadcast": {**weights_mapping_kb(broadcast_dir), "lora": broadcast[1]},
               "file_kb": os.path.getsize(os.path.join(kept_dir, "model.safetensors")) // 1024}, f)
'''


def test_two_processes_share_the_mapped_base_weights_instead_of_copying_them(tmp_path, tiny_tokenizer):
    """Each training process reads the base weights from the file's shared pages to the end of training.

    Copies used to replace them (bench/RESULTS.md, Memory): the loader, the Trainer and accelerate's prepare each
    placed the model on ``cpu:0``, the device of a CPU process group (torch copies every CPU tensor for that),
    and DDP's broadcast of every parameter wrote each frozen weight in place, making the copy-on-write mapping
    of the file a private copy."""
    import json

    from conftest import build_tiny_llama, run_two_processes

    kept_dir = build_tiny_llama(tmp_path / "kept", tiny_tokenizer, hidden=128)
    broadcast_dir = build_tiny_llama(tmp_path / "broadcast", tiny_tokenizer, hidden=128)
    run_two_processes(tmp_path, "ddp_weights.py", DDP_SCRIPT, kept_dir, broadcast_dir, timeout=300)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    for r in ranks:
        # the weights are read from the file's pages (resident), and none of them was copied
        assert r["kept"]["rss_kb"] > 0.5 * r["file_kb"] and r["kept"]["anon_kb"] == 0, r
        # the check can fail: with the frozen weights broadcast, nearly every page is a private copy
        assert r["broadcast"]["anon_kb"] > 0.9 * r["file_kb"], r
    # the adapters are still kept equal across the ranks (broadcast at the start, gradients averaged) and trained
    assert ranks[0]["kept"]["lora"] == ranks[1]["kept"]["lora"] == ranks[0]["broadcast"]["lora"]
    assert ranks[0]["kept"]["lora_b_max"] > 0
