"""Fine-tuning through the training loop: SFT, chat, LoRA, classification, resume, export; small and CPU-fast.

Base runs are untrained tiny models saved as a weights-only checkpoint (what lmforge import writes), so every test
also exercises starting a fine-tune from a base's weights with a fresh optimizer.
"""

import itertools
import json
import random
from pathlib import Path

import pytest
import torch
import transformers

from conftest import losses, quiet
from lmforge.api import LM
from lmforge.chat import CHAT_TEMPLATE_FILE, CHATML_TEMPLATE, IM_END, encode_chat
from lmforge.cli import main
from lmforge.config import BatchPlan, FinetuneConfig, RunConfig, apply_overrides
from lmforge.data.sft import Recipe, Record, chat_prompt, fit, load_sft
from lmforge.data.tokenizer import char_tokenizer_from_chars
from lmforge.errors import LMForgeError
from lmforge.eval.tasks import evaluate_task
from lmforge.interop import export_hf
from lmforge.model.gpt import GPT, ModelConfig
from lmforge.model.lora import LoRALinear, apply_lora, merged_state_dict
from lmforge.train import checkpoint
from lmforge.train.log import read_metrics
from lmforge.train.objectives import SupervisedFinetuning, task_module
from lmforge.train.trainer import finetune, train

LETTERS = "abcdef"
CHAT_CHARS = "abcdefghijklmnopqrstuvwxyz =\n<|>_!?"
QUICK = {"train.threads": 1, "train.log_every": 1, "optim.warmup_steps": 2, "train.batch_size": 8}


def base_run(root: Path, chars: str, seed: int = 0, **fields) -> Path:
    """An untrained tiny model as a run dir with a weights-only checkpoint at step 0, like an imported model."""
    tokenizer = char_tokenizer_from_chars(chars)
    model = {"vocab_size": tokenizer.vocab_size, "seq_len": 16, "n_layer": 2, "n_head": 4, "n_embd": 48, **fields}
    config = RunConfig(model=ModelConfig(**model), preset="test")
    root.mkdir(parents=True)
    config.save(root / "config.json")
    tokenizer.save(root / "tokenizer.json")
    torch.manual_seed(seed)
    checkpoint.save(root, 0, GPT(config.model), None, {}, keep_last=1)
    return root


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def reversal_records() -> tuple[list[dict], list[dict]]:
    """Every string of 3-5 letters from LETTERS, reversed: (train, 200 held-out test records)."""
    words = ["".join(p) for n in (3, 4, 5) for p in itertools.product(LETTERS, repeat=n)]
    random.Random(0).shuffle(words)
    records = [{"prompt": w + "=", "response": w[::-1]} for w in words]
    return records[200:], records[:200]


def test_sft_learns_to_reverse_strings(tmp_path):
    base = base_run(tmp_path / "base", LETTERS + "=")
    train, test = reversal_records()
    data, test_file = write_jsonl(tmp_path / "train.jsonl", train), write_jsonl(tmp_path / "test.jsonl", test)
    overrides = {**QUICK, "train.max_steps": 300, "optim.lr": 3e-3, "train.batch_size": 32, "optim.warmup_steps": 10,
                 "train.eval_every": 100, "train.eval_batches": 2, "train.log_every": 50}  # fmt: skip
    result = finetune(base, data, tmp_path / "ft", overrides=overrides, progress_bar=False, echo=quiet)
    # Learned, not guessed: chance is about 0% exact matches. Over train.seed 0-7 this run ends at val loss
    # 0.006-0.086 and 89-100% exact matches; the bounds leave room for other CPUs' rounding.
    assert result["step"] == 300 and result["val_loss"] < 0.3
    scores = evaluate_task(tmp_path / "ft", test_file)
    assert scores["metrics"]["exact_match"] >= 60, scores["examples"][:5]
    assert scores["format"] == "prompt" and len(scores["examples"]) == 200
    # an ordinary run dir: config records base and task, the base's tokenizer, checkpoints with optimizer state
    config = json.loads((tmp_path / "ft" / "config.json").read_text())
    assert config["finetune"]["base"] == str(base.resolve()) and config["train"]["objective"] == "sft"
    assert config["model"] == json.loads((base / "config.json").read_text())["model"]
    assert (tmp_path / "ft" / "tokenizer.json").read_bytes() == (base / "tokenizer.json").read_bytes()
    assert not (tmp_path / "ft" / CHAT_TEMPLATE_FILE).exists()  # plain records: a continuation model
    files = sorted(p.name for p in checkpoint.complete_checkpoints(tmp_path / "ft")[-1].iterdir())
    assert files == ["model.safetensors", "optimizer.pt", "state.json"]


def test_loss_masking_covers_exactly_the_response_tokens(tmp_path):
    tok = char_tokenizer_from_chars(CHAT_CHARS)
    recipe = Recipe.from_config(FinetuneConfig(template="{source}="), Record("r", {"source": "", "target": ""}))
    assert recipe.format == "translation"
    example = recipe.example(Record("r", {"source": "abc", "target": "xyz"}), tok)
    inputs, targets = example.inputs_and_targets()
    assert inputs == tok.encode("abc=xyz")  # everything but the end marker is input
    assert targets == [-100] * 3 + tok.encode("xyz") + [tok.eot_id]  # "=" predicts x, ... z predicts the end

    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "<|im_end|> bye"},
        {"role": "assistant", "content": "bye!"},
    ]
    chat = Recipe.from_config(FinetuneConfig(), Record("r", {"messages": messages}))
    assert chat.format == "chat" and chat.chat
    example = chat.example(Record("r", {"messages": messages}), tok)
    inputs, targets = example.inputs_and_targets()
    im_end = tok.hf.token_to_id(IM_END)
    assert [t for t in targets if t != -100] == tok.encode("hello") + [im_end] + tok.encode("bye!") + [im_end]
    # the prompt of each reply is what lmforge.chat renders with the ChatML template, special ids and all
    for reply in (2, 4):
        prompt = chat_prompt(tok, messages[:reply])
        assert prompt == encode_chat(tok, messages[:reply], CHATML_TEMPLATE)
        assert example.ids[: len(prompt)] == prompt  # the reply follows its prompt, as generation will see it
    assert not any(example.trained[: len(chat_prompt(tok, messages[:2]))])
    # text that looks like a special token stays text
    assert example.ids.count(im_end) == len(messages) and im_end not in tok.encode("<|im_end|>")

    # batches pad inputs and mask the padding out of the loss
    data = write_jsonl(
        tmp_path / "d.jsonl", [{"prompt": "ab=", "response": "ba"}, {"prompt": "abcd=", "response": "x"}]
    )
    config = apply_overrides(RunConfig(), {"model.vocab_size": tok.vocab_size, "model.seq_len": 16,
                                           "finetune.data": str(data), "finetune.val_fraction": 0.0,
                                           "train.batch_size": 2})  # fmt: skip
    objective = SupervisedFinetuning(config, tok, BatchPlan.derive(config.train, 16))
    batch = objective.train_batch(0, 0)
    (x,), y = batch.inputs, batch.targets
    assert x.shape == y.shape == (2, 6) and batch.tokens == 5 + 6
    trained = sorted(tuple(t for t in row if t != -100) for row in y.tolist())
    assert trained == sorted([tuple(tok.encode("ba")) + (tok.eot_id,), tuple(tok.encode("x")) + (tok.eot_id,)])


def test_overflow_policy(tmp_path):
    tok = char_tokenizer_from_chars(LETTERS + "g=")
    recipe = Recipe.from_config(FinetuneConfig(), Record("r", {"prompt": "", "response": ""}))
    long = recipe.example(Record("r", {"prompt": "abcdefg=", "response": "gfedcba"}), tok)
    assert len(long.ids) == 16
    cut = fit(long, 8, "truncate", False, "r")  # room for 9: half the context of prompt (its end), then the response
    assert cut.ids == tok.encode("efg=") + tok.encode("gfedc") and cut.trained == [False] * 4 + [True] * 5
    assert fit(long, 8, "skip", False, "r") is None
    with pytest.raises(LMForgeError, match="data.jsonl line 2 is 16 tokens"):
        fit(long, 8, "error", False, "data.jsonl line 2")
    short = recipe.example(Record("r", {"prompt": "ab=", "response": "ba"}), tok)
    assert fit(short, 8, "error", False, "r") is short

    data = write_jsonl(
        tmp_path / "d.jsonl", [{"prompt": "abcdefg=", "response": "gfedcba"}, {"prompt": "a=", "response": "a"}]
    )
    loaded = load_sft(FinetuneConfig(data=str(data), val_fraction=0.0, overflow="skip"), tok, 8, 0)
    assert len(loaded.train) == 1 and "0 record(s) truncated and 1 skipped" in loaded.notes[0]


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_finetune_resumes_like_pretraining(tmp_path, monkeypatch, lora):
    base = base_run(tmp_path / "base", LETTERS + "=")
    data = write_jsonl(tmp_path / "train.jsonl", reversal_records()[0][:64])
    overrides = {**QUICK, "train.max_steps": 12, "train.save_every": 4, "train.eval_every": 4, "optim.lr": 3e-3,
                 **({"lora.rank": 2} if lora else {})}  # fmt: skip
    finetune(base, data, tmp_path / "straight", overrides=overrides, progress_bar=False, echo=quiet)
    real_save = checkpoint.save

    def save_then_crash(run_dir, step, *args, **kwargs):
        path = real_save(run_dir, step, *args, **kwargs)
        if step == 8:
            raise KeyError("crash")  # the process dies right after writing checkpoint 8
        return path

    monkeypatch.setattr(checkpoint, "save", save_then_crash)
    with pytest.raises(KeyError):
        finetune(base, data, tmp_path / "crashed", overrides=overrides, progress_bar=False, echo=quiet)
    monkeypatch.setattr(checkpoint, "save", real_save)
    said = []
    finetune(base, data, tmp_path / "crashed", overrides=overrides, progress_bar=False, echo=said.append)
    assert any("resuming at step 8" in line for line in said)
    assert not any("starting from" in line for line in said)  # its own checkpoint, not the base's weights
    assert losses(tmp_path / "crashed") == losses(tmp_path / "straight")
    assert sorted(losses(tmp_path / "straight")) == list(range(1, 13))
    newest = checkpoint.complete_checkpoints(tmp_path / "crashed")[-1]
    assert (newest / checkpoint.TRAINING).is_file() == lora
    # lmforge train --out resumes a fine-tune run too; a changed flag or other data is refused
    assert train(None, tmp_path / "crashed", progress_bar=False, echo=quiet)["step"] == 12
    with pytest.raises(LMForgeError, match="optim.lr"):
        finetune(base, data, tmp_path / "crashed", overrides={**overrides, "optim.lr": 1.0}, echo=quiet)
    other = write_jsonl(tmp_path / "other.jsonl", reversal_records()[0][64:80])
    with pytest.raises(LMForgeError, match="not the data"):
        finetune(base, other, tmp_path / "crashed", overrides=overrides, echo=quiet)


def test_lora_trains_only_the_adapters_and_the_merged_model_equals_the_unmerged(tmp_path):
    base = base_run(tmp_path / "base", LETTERS + "=")
    data = write_jsonl(tmp_path / "train.jsonl", reversal_records()[0][:256])
    overrides = {
        **QUICK,
        "train.max_steps": 20,
        "optim.lr": 1e-2,
        "lora.rank": 4,
        "lora.alpha": 8,
        "lora.targets": "all",
    }
    said = []
    finetune(base, data, tmp_path / "ft", overrides=overrides, progress_bar=False, echo=said.append)
    assert any("LoRA rank 4" in line for line in said)
    config = RunConfig.load(tmp_path / "ft" / "config.json")
    module = task_module(config, GPT(config.model))
    assert {n.split(".")[-1] for n, p in module.named_parameters() if p.requires_grad} == {"lora_A", "lora_B"}
    assert checkpoint.load_latest(tmp_path / "ft", module, training=True)["step"] == 20
    base_weights = LM.load(base).model.state_dict()
    for name, param in module.state_dict().items():
        if "lora_" in name:
            continue
        assert torch.equal(param, base_weights[name.replace(".base.", ".")]), f"{name} changed"  # frozen
    assert all(m.lora_B.abs().sum() > 0 for m in module.modules() if hasattr(m, "lora_B"))  # the adapters trained

    merged = LM.load(tmp_path / "ft").model  # model.safetensors: the plain model with the adapters merged in
    ids = torch.randint(0, config.model.vocab_size, (3, 16), generator=torch.Generator().manual_seed(0))
    module.eval()
    with torch.no_grad():
        unmerged_logits, merged_logits = module(ids)[0], merged(ids)[0]
        base_logits = LM.load(base).model(ids)[0]
    assert torch.allclose(unmerged_logits, merged_logits, atol=1e-5), (unmerged_logits - merged_logits).abs().max()
    assert not torch.allclose(base_logits, merged_logits, atol=1e-3)
    # export reads the merged weights: transformers gives the fine-tuned logits
    export_hf(tmp_path / "ft", tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, merged_logits, atol=1e-4)


def test_lora_on_q_and_v_changes_only_their_rows_of_the_fused_projection():
    """Targets q_proj and v_proj adapt the query and value rows of qkv_proj (with GQA: k and v are narrower)."""
    torch.manual_seed(0)
    config = ModelConfig(vocab_size=20, seq_len=16, n_layer=2, n_head=4, n_kv_head=2, n_embd=32)
    model = GPT(config).eval()
    plain = GPT(config).eval()
    plain.load_state_dict(model.state_dict())
    wrapped = apply_lora(model, ["q_proj", "v_proj"], rank=2, alpha=4.0)
    assert wrapped == ["blocks.0.attn.qkv_proj[q,v]", "blocks.1.attn.qkv_proj[q,v]"]
    for module in model.modules():
        if isinstance(module, LoRALinear):
            assert module.lora_B.shape == (32 + 16, 2)  # 4 query heads and 2 value heads of 8
            torch.nn.init.normal_(module.lora_B)
    merged = merged_state_dict(model)
    weight, before = merged["blocks.0.attn.qkv_proj.weight"], plain.state_dict()["blocks.0.attn.qkv_proj.weight"]
    changed = (weight != before).any(dim=1)
    assert changed[:32].all() and not changed[32:48].any() and changed[48:].all()  # q rows, not k rows, v rows
    plain.load_state_dict(merged)
    ids = torch.randint(0, 20, (2, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(model(ids)[0], plain(ids)[0], atol=1e-5)


def test_chat_template_is_stored_and_round_trips_through_export(tmp_path):
    base = base_run(tmp_path / "base", CHAT_CHARS, seq_len=48)
    conversations = [
        {"messages": [{"role": "user", "content": w}, {"role": "assistant", "content": w[::-1]}]}
        for w in ("abc", "hello", "chat", "okay", "yes no")
    ]
    data = write_jsonl(tmp_path / "chat.jsonl", conversations)
    overrides = {**QUICK, "train.max_steps": 4, "finetune.val_fraction": 0.0}
    finetune(base, data, tmp_path / "ft", overrides=overrides, progress_bar=False, echo=quiet)
    assert (tmp_path / "ft" / CHAT_TEMPLATE_FILE).read_text() == CHATML_TEMPLATE
    lm = LM.load(tmp_path / "ft")
    assert lm.chat_template == CHATML_TEMPLATE
    export_hf(tmp_path / "ft", tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())["chat_template"] == CHATML_TEMPLATE
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}]
    theirs = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    assert theirs == chat_prompt(lm.tokenizer, messages)  # the prompt fine-tuning trained the model on
    # evaluation prompts with the template and stops at the end of the turn
    scores = evaluate_task(tmp_path / "ft", data, max_new_tokens=4)
    assert scores["format"] == "chat" and scores["examples"][0]["prompt"].startswith("<|im_start|>user\nabc")


def counting_records(n: int, seed: int) -> list[dict]:
    """8 letters each; a rare class (10%) draws 'a' half the time, the common one 30%: overlapping classes."""
    rng = random.Random(seed)
    records = []
    for _ in range(n):
        rare = rng.random() < 0.1
        text = "".join("a" if rng.random() < (0.5 if rare else 0.3) else rng.choice("bcd") for _ in range(8))
        records.append({"sentence": text, "label": "rare" if rare else "common"})
    return records


def test_class_weights_and_balanced_sampler_raise_minority_recall(tmp_path):
    base = base_run(tmp_path / "base", "abcd")
    data = write_jsonl(tmp_path / "train.jsonl", counting_records(2000, 1))
    test = write_jsonl(tmp_path / "test.jsonl", counting_records(1000, 2))
    common = {**QUICK, "train.max_steps": 150, "optim.lr": 3e-3, "train.batch_size": 32, "finetune.val_fraction": 0.0,
              "finetune.fields": "text=sentence"}  # fmt: skip
    variants = {
        "plain": {},
        "weights": {"finetune.class_weights": "balanced"},
        "sampler": {"finetune.sampler": "balanced"},
    }
    recall, auc = {}, {}
    for name, extra in variants.items():
        out = tmp_path / name
        finetune(base, data, out, task="classify", overrides={**common, **extra}, progress_bar=False, echo=quiet)
        metrics = evaluate_task(out, test)["metrics"]
        recall[name], auc[name] = metrics["per_class"]["rare"]["recall"], metrics["roc_auc"]
    assert json.loads((tmp_path / "plain" / "labels.json").read_text()) == ["common", "rare"]
    # every variant learned to rank (the a-count separates the classes): AUC 0.775-0.811 over train.seed 0-5
    assert min(auc.values()) > 0.65, auc
    # the unweighted run calls nearly everything common; weighting or balancing moves the threshold (over train.seed
    # 0-5: recall 0-0.05 unweighted, 0.55-0.85 weighted, 0.67-0.76 balanced)
    assert recall["weights"] > recall["plain"] + 0.2 and recall["sampler"] > recall["plain"] + 0.2, recall
    # the classification run dir is an ordinary one: its head and labels stay with it, and it loads as its
    # fine-tuned body, a plain GPT that generates
    assert (checkpoint.complete_checkpoints(tmp_path / "plain")[-1] / checkpoint.TRAINING).is_file()
    body, base_model = LM.load(tmp_path / "plain"), LM.load(base).model
    assert body.model.state_dict().keys() == base_model.state_dict().keys()
    assert not torch.equal(body.model.blocks[0].attn.qkv_proj.weight, base_model.blocks[0].attn.qkv_proj.weight)
    prompt = body.encode_prompt("ab")
    with torch.no_grad():
        first = body.model(torch.tensor([prompt]))[0][0, -1].argmax().item()
    assert body.complete("ab", max_new_tokens=1, temperature=0.0, stop_token_ids=())[0].token_ids == [first]


def test_finetune_cli_and_errors(tmp_path, capsys):
    base = base_run(tmp_path / "base", LETTERS + "=")
    data = write_jsonl(tmp_path / "train.jsonl", reversal_records()[0][:32])
    common = ["--data", str(data), "--max-steps", "2", "--quiet", "--train.threads", "1", "--train.batch_size", "4"]
    assert main(["finetune", str(base), "--out", str(tmp_path / "ft"), *common, "--lora.rank", "2"]) == 0
    assert "done: 2 steps" in capsys.readouterr().out
    assert RunConfig.load(tmp_path / "ft" / "config.json").lora.rank == 2
    assert main(["eval", str(tmp_path / "ft"), "--task", str(data), "--limit", "4", "--max-new-tokens", "4"]) == 0
    assert "4 records: BLEU" in capsys.readouterr().out
    assert (tmp_path / "ft" / "eval" / "task_eval.md").is_file()

    bad = write_jsonl(tmp_path / "bad.jsonl", [{"question": "a", "reply": "b"}])
    unknown = write_jsonl(tmp_path / "unknown.jsonl", [{"prompt": "abc=", "response": "cbZ"}])
    cases = [
        (["--data", str(bad)], "finetune.fields"),
        (
            ["--data", str(unknown)],
            "unknown.jsonl line 1: text has 1 character(s) the character vocabulary lacks ('Z')",
        ),
        (["--data", str(tmp_path / "missing.jsonl")], "is not a file"),
        ([*common, "--lora.targets", "lm_head"], "lora.targets"),
        ([*common, "--task", "classify"], "needs a label field 'label'"),
    ]
    for args, message in cases:
        out = tmp_path / "new"
        assert main(["finetune", str(base), "--out", str(out), "--max-steps", "2", *args]) == 2
        assert message in capsys.readouterr().err
        assert not out.exists()  # nothing half-written
    assert main(["finetune", str(tmp_path / "nothing"), "--out", str(tmp_path / "new"), *common]) == 2
    assert "is not a run dir" in capsys.readouterr().err
    with pytest.raises(LMForgeError, match="model.n_layer cannot change in a fine-tune"):
        finetune(base, data, tmp_path / "new", overrides={"model.n_layer": 3, "train.max_steps": 2})
    with pytest.raises(LMForgeError, match="holds a pretraining run"):
        finetune(base, data, base, overrides={"train.max_steps": 2})
    assert not (tmp_path / "new").exists()


def test_padding_changes_nothing_for_an_encoder_head(tmp_path):
    torch.manual_seed(0)
    encoder = GPT(ModelConfig(vocab_size=12, seq_len=16, n_layer=2, n_head=4, n_embd=32, causal=False)).eval()
    config = apply_overrides(RunConfig(), {"train.objective": "classify", "model.causal": False})
    classifier = task_module(config, encoder, 3).eval()
    assert classifier.pooling == "mean"
    short, long = torch.tensor([[3, 4, 5]]), torch.tensor([[6, 7, 8, 9, 10, 11]])
    padded = torch.tensor([[3, 4, 5, 0, 0, 0], [6, 7, 8, 9, 10, 11]])
    with torch.no_grad():
        alone = torch.cat([classifier(short, torch.tensor([3])), classifier(long, torch.tensor([6]))])
        together = classifier(padded, torch.tensor([3, 6]))
        hidden, _ = encoder(padded, attention_mask=padded != 0, return_hidden=True)
        hidden_alone, _ = encoder(short, return_hidden=True)
    assert torch.allclose(alone, together, atol=1e-5)
    assert torch.allclose(hidden[0, :3], hidden_alone[0], atol=1e-5)

    # and through lmforge finetune, with a separate validation file: an encoder base, mean pooling
    base = base_run(tmp_path / "base", "abcd", causal=False)
    records = counting_records(200, 3)
    data, val = write_jsonl(tmp_path / "t.jsonl", records[:160]), write_jsonl(tmp_path / "v.jsonl", records[160:])
    overrides = {**QUICK, "train.max_steps": 4, "train.eval_every": 2, "finetune.fields": "text=sentence",
                 "finetune.val_data": str(val)}  # fmt: skip
    result = finetune(base, data, tmp_path / "enc", task="classify", overrides=overrides, echo=quiet)
    evaluations = [r for r in read_metrics(tmp_path / "enc") if "val_accuracy" in r]
    assert [r["step"] for r in evaluations] == [2, 4]  # on the 40 records of the validation file
    assert result["val_loss"] == evaluations[-1]["val_loss"] and 0 < result["val_loss"] < 10
    assert all(r["val_accuracy"] * 40 == round(r["val_accuracy"] * 40) for r in evaluations)
    with pytest.raises(LMForgeError, match="encoder"):
        evaluate_task(base, data)  # an encoder does not generate
