"""Hugging Face interop against the real `transformers`: logits and greedy tokens equal, both directions."""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, processors

from lmforge.api import LM
from lmforge.chat import CHAT_TEMPLATE_FILE, CHATML_TEMPLATE, encode_chat
from lmforge.cli import main
from lmforge.config import RunConfig
from lmforge.data.tokenizer import EOT, Tokenizer, bpe_tokenizer, char_tokenizer
from lmforge.errors import LMForgeError
from lmforge.eval.tasks import evaluate_text
from lmforge.generate import SamplingParams, generate
from lmforge.interop import export_hf, import_hf
from lmforge.model.gpt import GPT, ModelConfig
from lmforge.train import checkpoint
from lmforge.train.trainer import finetune

TEXT = "First Citizen:\nSpeak, speak . Before we proceed any further, hear me.\ncafé, naïve, 東京 🙂\tdone\n"
LLAMA = {"pos_emb": "rope", "norm": "rmsnorm", "mlp": "swiglu", "bias": False}
EXPORTS = {
    "gpt2_tied": {},
    "gpt2_untied": {"tie_embeddings": False, "norm_eps": 1e-6, "dropout": 0.1},
    "llama_gqa_untied": {**LLAMA, "n_kv_head": 2, "tie_embeddings": False, "rope_theta": 500.0},
    "llama_mqa_tied": {**LLAMA, "n_kv_head": 1},
    "llama_mha_bias": {**LLAMA, "bias": True, "mlp_ratio": 3.0},
}


def make_run(root: Path, tokenizer=None, seed: int = 0, **fields) -> tuple[Path, GPT]:
    """A run dir holding a randomly perturbed tiny model: biases and norm weights are not 0 and 1, so a swapped or
    untransposed tensor changes the logits."""
    tokenizer = tokenizer or char_tokenizer([TEXT])
    fields = {"vocab_size": tokenizer.vocab_size + 3, "seq_len": 24, "n_layer": 2, "n_head": 4, "n_embd": 32, **fields}
    config = RunConfig(model=ModelConfig(**fields), preset="test")
    torch.manual_seed(seed)
    model = GPT(config.model).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    run = root / "run"
    run.mkdir(parents=True)
    config.save(run / "config.json")
    tokenizer.save(run / "tokenizer.json")
    checkpoint.save(run, 5, model, None, {}, keep_last=1)
    return run, model


def input_ids(vocab_size: int, length: int = 24, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab_size, (2, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("variant", EXPORTS)
def test_export_gives_equal_logits_and_greedy_tokens_in_transformers(tmp_path, variant):
    run, model = make_run(tmp_path, **EXPORTS[variant])
    result = export_hf(run, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    expected = "LlamaForCausalLM" if variant.startswith("llama") else "GPT2LMHeadModel"
    assert type(hf).__name__ == expected == result["architecture"]
    assert (hf.lm_head.weight is hf.get_input_embeddings().weight) == model.config.tie_embeddings
    ids = input_ids(model.config.vocab_size)
    with torch.no_grad():
        ours, _ = model(ids)
        theirs = hf(ids).logits
    assert ours.shape == theirs.shape
    assert torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()

    hf.generation_config.eos_token_id = None  # run the full length, as ours does
    prompt = ids[0, :5].tolist()
    greedy = SamplingParams(max_new_tokens=19, temperature=0.0, stop_token_ids=())
    ours_greedy = generate(model, None, [prompt], greedy)[0].token_ids
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=19, do_sample=False, pad_token_id=0)
    assert out[0, 5:].tolist() == ours_greedy


@pytest.mark.parametrize(
    "fields, field",
    [
        ({"pos_emb": "sinusoidal"}, "pos_emb"),
        ({"pos_emb": "none"}, "pos_emb"),
        ({"mlp": "relu2"}, "mlp"),
        ({"qk_norm": True}, "qk_norm"),
        ({"causal": False}, "causal"),
        ({"n_kv_head": 2}, "n_kv_head"),
        ({"bias": False}, "bias"),
        ({**LLAMA, "norm": "layernorm"}, "norm"),
        ({**LLAMA, "mlp": "relu2"}, "mlp"),
    ],
)
def test_export_refuses_what_transformers_cannot_express(tmp_path, fields, field):
    run, _ = make_run(tmp_path, **fields)
    with pytest.raises(LMForgeError, match=rf"model\.{field}="):
        export_hf(run, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_export_loads_offline_with_nothing_of_ours(tmp_path):
    """A fresh interpreter where `import lmforge` fails loads model and tokenizer: char-level and byte-level BPE."""
    gpt2_run, gpt2 = make_run(tmp_path / "a")
    (gpt2_run / CHAT_TEMPLATE_FILE).write_text(CHATML_TEMPLATE)
    bpe = bpe_tokenizer(iter([TEXT] * 20), vocab_size=300)
    llama_run, llama = make_run(tmp_path / "b", tokenizer=bpe, **LLAMA, n_kv_head=2)
    export_hf(gpt2_run, tmp_path / "gpt2")
    export_hf(llama_run, tmp_path / "llama")
    script = """
import json, sys
sys.modules["lmforge"] = None  # any import of our code fails
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
text, results = sys.argv[1], []
for out in sys.argv[2:]:
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = tokenizer(text)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0]
    chat = None
    if tokenizer.chat_template:
        chat = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False,
                                             add_generation_prompt=True)
    results.append({"ids": ids, "text": tokenizer.decode(ids), "eos": tokenizer.eos_token, "pad": tokenizer.pad_token,
                    "eos_id": model.generation_config.eos_token_id, "logits": logits.tolist(), "chat": chat})
print(json.dumps(results))
"""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}
    sample = TEXT[:22]
    out = subprocess.run(
        [sys.executable, "-c", script, sample, str(tmp_path / "gpt2"), str(tmp_path / "llama")],
        capture_output=True,
        text=True,
        env=env,
        cwd=tmp_path,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    for result, run, model in zip(json.loads(out.stdout), (gpt2_run, llama_run), (gpt2, llama)):
        lm = LM.load(run)
        ids = lm.tokenizer.encode(sample)
        assert result["ids"] == ids
        assert result["text"] == sample
        assert (result["eos"], result["pad"]) == (EOT, "<|pad|>")
        im_end = lm.tokenizer.hf.token_to_id("<|im_end|>")
        if run == gpt2_run:  # a chat template travels, and generation stops at the end of a turn too
            assert result["chat"] == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
            assert result["eos_id"] == [lm.tokenizer.eot_id, im_end]
        else:
            assert result["chat"] is None and result["eos_id"] == lm.tokenizer.eot_id
        with torch.no_grad():
            ours, _ = model(torch.tensor([ids]))
        assert torch.allclose(ours[0], torch.tensor(result["logits"]), atol=1e-4)


def hf_char_tokenizer(special: list[str], bos: str | None = None, eos: bool = True):
    """A transformers fast tokenizer over TEXT's characters with the given special tokens first, the last of them
    its end-of-sequence token (unless eos is False); with bos, it puts that token before every text, as Llama 2 and
    3 tokenizers do (a post-processor template)."""
    vocab = {token: i for i, token in enumerate(special)}
    for ch in sorted(set(TEXT)):
        vocab.setdefault(ch, len(vocab))
    hf = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    hf.add_special_tokens(special)
    hf.decoder = decoders.Fuse()
    named = {"eos_token": special[-1]} if eos else {}
    if bos is None:
        return transformers.PreTrainedTokenizerFast(tokenizer_object=hf, **named)
    hf.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
    )
    return transformers.PreTrainedTokenizerFast(tokenizer_object=hf, bos_token=bos, **named)


def save_tiny_llama(path: Path, tokenizer, vocab_size: int, max_shard_size=None, edit=None, **fields):
    """A 2-layer, 32-wide LlamaForCausalLM (perturbed, then changed by edit(model) if given) and its tokenizer saved
    with save_pretrained; returns the model. fields set or override its LlamaConfig (<s> is id 1 and </s> id 2, as
    hf_char_tokenizer makes them)."""
    config = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "rms_norm_eps": 1e-5,
              "rope_theta": 500.0, "bos_token_id": 1, "eos_token_id": 2, **fields}  # fmt: skip
    torch.manual_seed(0)
    hf_model = perturbed(transformers.LlamaForCausalLM(transformers.LlamaConfig(vocab_size=vocab_size, **config)))
    if edit is not None:
        edit(hf_model)
    hf_model.save_pretrained(path, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    tokenizer.save_pretrained(path)
    return hf_model


def perturbed(model):
    """transformers initialises biases to 0 and norms to 1; move them so a misplaced tensor shows."""
    torch.manual_seed(3)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    return model.eval()


@pytest.fixture
def hf_gpt2(tmp_path) -> tuple[Path, torch.nn.Module]:
    tokenizer = hf_char_tokenizer(["<|pad|>", EOT])
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    config = transformers.GPT2Config(
        vocab_size=len(tokenizer) + 2, n_positions=24, n_embd=32, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=1
    )
    torch.manual_seed(0)
    model = perturbed(transformers.GPT2LMHeadModel(config))
    path = tmp_path / "hf_gpt2"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path, model


def assert_same_logits(run: Path, hf_model, seq_len: int = 24) -> LM:
    lm = LM.load(run)
    ids = input_ids(lm.model.config.vocab_size, seq_len)
    with torch.no_grad():
        ours, _ = lm.model(ids)
        theirs = hf_model(ids).logits
    assert torch.allclose(ours, theirs, atol=1e-4), (ours - theirs).abs().max()
    return lm


def test_import_gpt2_made_by_transformers(tmp_path, hf_gpt2):
    path, hf_model = hf_gpt2
    result = import_hf(path, tmp_path / "run")
    assert result["notes"] == [] and result["architecture"] == "GPT2LMHeadModel"
    lm = assert_same_logits(tmp_path / "run", hf_model)
    assert lm.config.preset == "imported" and lm.model.config.tie_embeddings
    assert lm.tokenizer.eot_id == 1
    assert lm.chat_template == "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    # greedy decoding through our engine (KV cache, stop at end-of-text) picks transformers' tokens
    prompt = lm.encode_prompt("Speak")
    ours = lm.complete("Speak", max_new_tokens=10, temperature=0.0)[0]
    with torch.no_grad():
        theirs = hf_model.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, pad_token_id=0)
    theirs = theirs[0, len(prompt) :].tolist()
    assert ours.token_ids == (theirs[:-1] if theirs[-1] == 1 and len(theirs) < 10 else theirs)
    assert ours.text == lm.tokenizer.decode(ours.token_ids)


def test_import_gpt2_file_in_the_original_layout(tmp_path, hf_gpt2):
    """The GPT-2 files on the hub have no `transformer.` prefix and carry causal-mask buffers."""
    path, hf_model = hf_gpt2
    tensors = load_file(path / "model.safetensors")
    legacy = {name.removeprefix("transformer."): t for name, t in tensors.items()}
    legacy["h.0.attn.bias"] = torch.tril(torch.ones(1, 1, 24, 24))
    save_file(legacy, path / "model.safetensors", metadata={"format": "pt"})
    import_hf(path, tmp_path / "run")
    assert_same_logits(tmp_path / "run", hf_model)


@pytest.mark.parametrize(
    "fields",
    [
        {"num_key_value_heads": 2, "intermediate_size": 48, "tie_word_embeddings": False, "padding": 0},
        {
            "padding": 5,  # embeddings for more ids than the tokenizer has, as many models pad their vocabulary
            "num_key_value_heads": 4,
            "intermediate_size": 64,
            "tie_word_embeddings": True,
            "attention_bias": True,
            "mlp_bias": True,
        },
    ],
    ids=["gqa_untied_sharded", "mha_tied_bias"],
)
def test_import_llama_made_by_transformers(tmp_path, fields):
    tokenizer = hf_char_tokenizer(["<unk>", "<s>", "</s>"])  # Llama style: no <|endoftext|>, </s> ends documents
    fields = dict(fields)
    padding = fields.pop("padding")
    path = tmp_path / "hf_llama"
    hf_model = save_tiny_llama(
        path, tokenizer, len(tokenizer) + padding, max_shard_size="20KB", max_position_embeddings=24, **fields
    )
    if fields["num_key_value_heads"] == 2:
        assert (path / "model.safetensors.index.json").is_file()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing was changed: nothing to warn about
        result = import_hf(path, tmp_path / "run")
    lm = assert_same_logits(tmp_path / "run", hf_model)
    c = lm.model.config
    assert (c.kv_heads, c.mlp_hidden, c.rope_theta, c.tie_embeddings) == (
        fields["num_key_value_heads"],
        fields["intermediate_size"],
        500.0,
        fields["tie_word_embeddings"],
    )
    # The tokenizer is the original, and its own </s> separates documents and stops generation
    assert (tmp_path / "run" / "tokenizer.json").read_text() == (path / "tokenizer.json").read_text()
    assert result["notes"] == [] and c.vocab_size == len(tokenizer) + padding
    assert (lm.tokenizer.eot_token, lm.tokenizer.eot_id, lm.tokenizer.vocab_size) == ("</s>", 2, len(tokenizer))
    assert lm.generate("Speak", max_new_tokens=5, temperature=0.0)[0]


@pytest.mark.parametrize("variant", ["gpt2_untied", "llama_gqa_untied", "llama_mqa_tied"])
def test_export_import_round_trip_is_exact(tmp_path, variant):
    run, model = make_run(tmp_path, **EXPORTS[variant])
    (run / CHAT_TEMPLATE_FILE).write_text(CHATML_TEMPLATE)
    export_hf(run, tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "back")
    assert (tmp_path / "back" / CHAT_TEMPLATE_FILE).read_text() == CHATML_TEMPLATE
    back = LM.load(tmp_path / "back")
    assert back.model.config == model.config
    ours, theirs = model.state_dict(), back.model.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[name], theirs[name]) for name in ours)
    assert (tmp_path / "back" / "tokenizer.json").read_bytes() == (run / "tokenizer.json").read_bytes()


def edit_config(path: Path, **changes) -> None:
    config = json.loads((path / "config.json").read_text())
    config.update(changes)
    (path / "config.json").write_text(json.dumps(config))


@pytest.mark.parametrize(
    "change, message",
    [
        ({"model_type": "bert"}, "model_type 'bert'"),
        ({"activation_function": "relu"}, "activation_function='relu'"),
        ({"n_layer": 1}, "h.1"),  # a tensor the config does not account for
        ({"n_embd": 48}, "shape"),
    ],
)
def test_import_refuses_what_it_cannot_express(tmp_path, hf_gpt2, change, message):
    path, _ = hf_gpt2
    edit_config(path, **change)
    with pytest.raises(LMForgeError, match=message):
        import_hf(path, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_import_refuses_llama_variants_and_missing_files(tmp_path, hf_gpt2):
    path, _ = hf_gpt2
    for name in ("model.safetensors", "tokenizer.json"):
        (path / name).rename(path / (name + ".away"))
    with pytest.raises(LMForgeError, match="no model.safetensors"):
        import_hf(path, tmp_path / "run")
    (path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(LMForgeError, match="pickle"):
        import_hf(path, tmp_path / "run")
    (path / "model.safetensors.away").rename(path / "model.safetensors")
    with pytest.raises(LMForgeError, match="tokenizer.json"):
        import_hf(path, tmp_path / "run")
    llama = {"model_type": "llama", "hidden_size": 32, "num_attention_heads": 4, "num_hidden_layers": 1}
    original = (path / "config.json").read_text()
    for change, message in [
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling='llama3'"),
        ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
        ({"head_dim": 16}, "head_dim=16"),
        ({"attention_bias": True}, "mlp_bias"),
    ]:
        (path / "config.json").write_text(original)
        edit_config(path, **llama, **change)
        with pytest.raises(LMForgeError, match=message):
            import_hf(path, tmp_path / "run")


def test_cli_export_and_import(tmp_path, capsys):
    run, model = make_run(tmp_path, **LLAMA)
    assert main(["export", str(run), "--format", "hf", str(tmp_path / "hf")]) == 0
    assert "LlamaForCausalLM" in capsys.readouterr().out
    assert main(["export", str(run), "--format", "hf", str(tmp_path / "hf")]) == 2  # exists
    assert "--overwrite" in capsys.readouterr().err
    assert main(["import", str(tmp_path / "hf"), "--out", str(tmp_path / "back")]) == 0
    assert "lmforge generate" in capsys.readouterr().out
    back = LM.load(tmp_path / "back")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), back.model.state_dict().values()))

    sinusoidal, _ = make_run(tmp_path / "s", pos_emb="sinusoidal")
    assert main(["export", str(sinusoidal), "--format", "hf", str(tmp_path / "hf2")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("lmforge: error: ") and "model.pos_emb='sinusoidal'" in err and err.count("\n") == 1


BOS_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


@pytest.fixture
def hf_llama_bos(tmp_path) -> tuple[Path, torch.nn.Module, transformers.PreTrainedTokenizerBase]:
    """A tiny Llama whose tokenizer puts <s> before every text, with a chat template that writes {{ bos_token }}.
    Its tokenizer_config.json says add_bos_token, as Llama 2's does (transformers 5 reads the post-processor)."""
    tokenizer = hf_char_tokenizer(["<unk>", "<s>", "</s>"], bos="<s>")
    tokenizer.chat_template = BOS_CHAT_TEMPLATE
    path = tmp_path / "hf_llama_bos"
    hf_model = save_tiny_llama(  # as many embeddings as tokens, as in every real Llama
        path, tokenizer, len(tokenizer), intermediate_size=48, num_key_value_heads=2, max_position_embeddings=64
    )
    tokenizer_config = json.loads((path / "tokenizer_config.json").read_text())
    (path / "tokenizer_config.json").write_text(json.dumps({**tokenizer_config, "add_bos_token": True}))
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)  # as a user of the original dir gets it
    assert tokenizer("Speak")["input_ids"][0] == tokenizer.bos_token_id == 1
    return path, hf_model, tokenizer


def import_quietly(path: Path, run: Path) -> dict:
    """import_hf, failing on any warning it would give."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return import_hf(path, run)


def test_import_llama_with_bos_generates_as_transformers(tmp_path, hf_llama_bos, capsys):
    path, hf_model, tokenizer = hf_llama_bos
    result = import_quietly(path, tmp_path / "run")
    assert result["notes"] == []  # tokenizer.json and tokenizer_config.json agree, </s> ends documents: all as it was
    lm = LM.load(tmp_path / "run")
    assert (lm.tokenizer.bos_token, lm.tokenizer.bos_id) == ("<s>", 1)

    prompt = "Speak, speak"
    inputs = tokenizer(prompt, return_tensors="pt")
    assert lm.tokenizer.encode_prompt(prompt) == inputs["input_ids"][0].tolist()
    hf_model.generation_config.eos_token_id = None  # run the full length, as ours does
    with torch.no_grad():
        out = hf_model.generate(**inputs, max_new_tokens=16, do_sample=False, pad_token_id=0)
    theirs = out[0, inputs["input_ids"].shape[1] :].tolist()
    completion = lm.complete(prompt, max_new_tokens=16, temperature=0.0, stop_token_ids=())[0]
    assert completion.token_ids == theirs
    text = tokenizer.decode(theirs, skip_special_tokens=True)
    assert lm.generate(prompt, max_new_tokens=16, temperature=0.0, stop_token_ids=())[0] == text
    assert "".join(lm.stream(prompt, max_new_tokens=16, temperature=0.0, stop_at_eot=False)) == text
    args = ["generate", str(tmp_path / "run"), "--prompt", prompt, "--temperature", "0", "--max-new-tokens", "16"]
    assert main(args) == 0
    assert capsys.readouterr().out == prompt + text + "\n"
    # an empty prompt is the beginning-of-sequence token alone, as transformers encodes ""
    assert lm.encode_prompt("") == tokenizer("")["input_ids"] == [1]


def test_import_llama_with_bos_scores_as_transformers(tmp_path, hf_llama_bos):
    path, hf_model, tokenizer = hf_llama_bos
    import_quietly(path, tmp_path / "run")
    text = TEXT[:40]
    inputs = tokenizer(text, return_tensors="pt")
    assert inputs["input_ids"].shape[1] <= hf_model.config.max_position_embeddings  # one window: comparable
    with torch.no_grad():
        theirs = hf_model(**inputs, labels=inputs["input_ids"]).loss.item()
    (tmp_path / "text.txt").write_text(text, encoding="utf-8")
    result = evaluate_text(tmp_path / "run", tmp_path / "text.txt")
    assert result["tokens"] == len(text)  # every character predicted once, the first after <s>
    assert abs(result["loss"] - theirs) < 1e-4, (result["loss"], theirs)


def test_import_llama_with_bos_chat_template_writes_it_once(tmp_path, hf_llama_bos):
    path, _, tokenizer = hf_llama_bos
    import_quietly(path, tmp_path / "run")
    lm = LM.load(tmp_path / "run")
    assert lm.chat_template == BOS_CHAT_TEMPLATE
    messages = [{"role": "user", "content": "Speak, speak."}, {"role": "assistant", "content": "hear me"}]
    messages.append({"role": "user", "content": "done"})
    ours = encode_chat(lm.tokenizer, messages, lm.chat_template)
    theirs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert ours == list(theirs)
    assert ours.count(lm.tokenizer.bos_id) == 1 and ours[0] == lm.tokenizer.bos_id
    # without a template the conversation is plain text, and starts with <s> like any prompt
    plain = encode_chat(lm.tokenizer, messages, None)
    assert plain[0] == lm.tokenizer.bos_id and plain.count(lm.tokenizer.bos_id) == 1


def test_export_keeps_bos_through_a_round_trip(tmp_path, hf_llama_bos):
    path, hf_model, _ = hf_llama_bos
    import_quietly(path, tmp_path / "run")
    export_hf(tmp_path / "run", tmp_path / "hf")
    exported = json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())
    assert (exported["add_bos_token"], exported["bos_token"], exported["eos_token"]) == (True, "<s>", "</s>")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["vocab_size"]) == (1, 2, hf_model.config.vocab_size)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tokenizer("Speak")["input_ids"] == LM.load(tmp_path / "run").tokenizer.encode_prompt("Speak")
    assert tokenizer("Speak")["input_ids"][0] == 1 and tokenizer.eos_token == "</s>"
    import_quietly(tmp_path / "hf", tmp_path / "back")
    back = LM.load(tmp_path / "back")
    assert (back.tokenizer.bos_id, back.encode_prompt("Speak")) == (1, tokenizer("Speak")["input_ids"])
    assert (tmp_path / "back" / "tokenizer.json").read_text() == (path / "tokenizer.json").read_text()


def test_a_model_trained_without_bos_is_exported_without_it(tmp_path):
    """A run lmforge trained with a tokenizer whose post-processor adds <s> never saw it: it is not added to
    prompts, and the export's tokenizer.json leaves it out too, so transformers encodes as we do."""
    hf = hf_char_tokenizer([EOT, "<|pad|>", "<s>"], bos="<s>").backend_tokenizer
    run, _ = make_run(tmp_path, tokenizer=Tokenizer(hf, "bpe"), **LLAMA)
    lm = LM.load(run)
    assert lm.tokenizer.bos_id is None and lm.encode_prompt("Speak") == lm.tokenizer.encode("Speak")
    export_hf(run, tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())["add_bos_token"] is False
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tokenizer("Speak")["input_ids"] == lm.tokenizer.encode("Speak")
    import_hf(tmp_path / "hf", tmp_path / "back")
    assert LM.load(tmp_path / "back").tokenizer.bos_id is None


def test_import_follows_tokenizer_json_when_tokenizer_config_disagrees(tmp_path, hf_llama_bos):
    path, _, _ = hf_llama_bos
    spec = json.loads((path / "tokenizer.json").read_text())
    (path / "tokenizer.json").write_text(json.dumps({**spec, "post_processor": None}))
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    with pytest.warns(UserWarning, match="add_bos_token=True, but tokenizer.json adds no beginning"):
        import_hf(path, tmp_path / "run")
    lm = LM.load(tmp_path / "run")
    assert lm.tokenizer.bos_id is None and lm.encode_prompt("Speak") == tokenizer("Speak")["input_ids"]


def test_import_adds_an_end_token_only_to_a_tokenizer_without_one_and_grows_the_embeddings(tmp_path):
    """No end-of-sequence token anywhere: <|endoftext|> is added after the existing ids and, as the embeddings had no
    row for it, they (and the head) grow by one row, the mean of the others; the export then has that row too."""
    tokenizer = hf_char_tokenizer(["<unk>", "<s>"], eos=False)
    path = tmp_path / "hf_llama"
    hf_model = save_tiny_llama(path, tokenizer, len(tokenizer), eos_token_id=None, max_position_embeddings=24)
    with pytest.warns(UserWarning) as said:
        result = import_hf(path, tmp_path / "run")
    assert [str(w.message) for w in said] == result["notes"] and len(result["notes"]) == 2
    assert "added <|endoftext|> as special token" in result["notes"][0]
    assert "grew the embeddings and the output head to" in result["notes"][1]
    lm = LM.load(tmp_path / "run")
    n = len(tokenizer)
    assert (lm.tokenizer.eot_token, lm.tokenizer.eot_id, lm.model.config.vocab_size) == (EOT, n, n + 1)
    ids = input_ids(n)
    with torch.no_grad():
        ours, _ = lm.model(ids)
        theirs = hf_model(ids).logits
    assert torch.allclose(ours[..., :n], theirs, atol=1e-4)  # the original tokens' logits are unchanged
    assert torch.allclose(ours[..., n], theirs.mean(dim=-1), atol=1e-4)  # the new row is the mean row: its logit too
    assert torch.equal(lm.model.tok_emb.weight[n], hf_model.model.embed_tokens.weight.mean(dim=0))
    export_hf(tmp_path / "run", tmp_path / "hf")
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert exported.config.vocab_size == n + 1 and exported.config.eos_token_id == n
    with torch.no_grad():
        assert torch.allclose(exported(ids).logits, ours, atol=1e-4)


def stops_after(after: str, then: str, tokenizer):
    """An edit for save_tiny_llama: greedy decoding writes `then` after `after`, and </s> after `then`, whatever came
    before. Their embeddings are one large basis vector each, so the residual stream at their positions is that
    vector, near enough, and the head rows of `then` and of </s> read it."""
    first, second, eos = (tokenizer.convert_tokens_to_ids(t) for t in (after, then, "</s>"))

    def edit(model) -> None:
        embeddings, head = model.model.embed_tokens.weight, model.lm_head.weight
        with torch.no_grad():
            for token, axis in ((first, 0), (second, 1)):
                embeddings[token] = 0.0
                embeddings[token, axis] = 1000.0
            for token, axis in ((second, 0), (eos, 1)):
                head[token] = 0.0
                head[token, axis] = 50.0

    return edit


def test_an_imported_llama_whose_tokens_fill_its_embeddings_finetunes_generates_and_exports(tmp_path):
    """Every real Llama: as many embeddings as tokens. Nothing is added; </s> separates documents and stops
    generation; full and LoRA fine-tunes of it generate, stop at </s> and export, and transformers decodes the
    export greedily as we do."""
    tokenizer = hf_char_tokenizer(["<unk>", "<s>", "</s>"], bos="<s>")
    path = tmp_path / "hf_llama"
    save_tiny_llama(path, tokenizer, len(tokenizer), edit=stops_after(":", "\n", tokenizer),
                    intermediate_size=48, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    import_quietly(path, tmp_path / "run")
    base = LM.load(tmp_path / "run")
    assert (base.tokenizer.eot_token, base.model.config.vocab_size) == ("</s>", len(tokenizer))
    records = [{"prompt": "First Citizen:", "response": "\nSpeak."}, {"prompt": "Speak", "response": ", hear me."}]
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    for name, lora in (("full", {}), ("lora", {"lora.rank": 4})):
        overrides = {"train.max_steps": 3, "train.batch_size": 2, "train.threads": 1, **lora}
        finetune(tmp_path / "run", data, tmp_path / name, overrides=overrides, progress_bar=False, echo=lambda *a: None)
        tuned = LM.load(tmp_path / name)
        assert (tuned.tokenizer.eot_id, tuned.tokenizer.bos_id, tuned.model.config.vocab_size) == (2, 1, len(tokenizer))
        # "\n" after ":", then </s>, which ends the output
        done = tuned.complete("First Citizen:", max_new_tokens=10, temperature=0.0)[0]
        assert (done.text, done.finish_reason, done.completion_tokens) == ("\n", "stop", 2)
        export_hf(tmp_path / name, tmp_path / f"{name}_hf")
        config = json.loads((tmp_path / f"{name}_hf" / "config.json").read_text())
        assert (config["vocab_size"], config["eos_token_id"], config["bos_token_id"]) == (len(tokenizer), 2, 1)
        hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / f"{name}_hf").eval()
        hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / f"{name}_hf")
        for prompt in ("First Citizen:", "Speak, speak", "café"):
            inputs = hf_tokenizer(prompt, return_tensors="pt")
            assert inputs["input_ids"][0].tolist() == tuned.encode_prompt(prompt)
            with torch.no_grad():  # transformers stops at the generation config's eos_token_id, </s>
                out = hf.generate(**inputs, max_new_tokens=12, do_sample=False, pad_token_id=0)
            ours = tuned.complete(prompt, max_new_tokens=12, temperature=0.0)[0]
            stop = [2] if ours.finish_reason == "stop" else []
            assert out[0, inputs["input_ids"].shape[1] :].tolist() == ours.token_ids + stop, (name, prompt)


def test_export_pads_on_the_left_for_batched_generation(tmp_path):
    """A decoder continues its prompt's last token: batched generation in transformers pads before the prompt, and a
    padded prompt then decodes as it does alone."""
    run, _ = make_run(tmp_path, **LLAMA)
    export_hf(run, tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())["padding_side"] == "left"
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert tokenizer.padding_side == "left"
    prompts = ["First Citizen:", "Speak"]
    batch = tokenizer(prompts, return_tensors="pt", padding=True)
    assert batch["attention_mask"][1, 0] == 0  # the shorter prompt is padded in front
    settings = {"max_new_tokens": 6, "do_sample": False, "eos_token_id": None, "pad_token_id": tokenizer.pad_token_id}
    with torch.no_grad():
        together = model.generate(**batch, **settings)[:, batch["input_ids"].shape[1] :]
        for row, prompt in enumerate(prompts):
            alone = model.generate(**tokenizer(prompt, return_tensors="pt"), **settings)
            assert together[row].tolist() == alone[0, -6:].tolist()
