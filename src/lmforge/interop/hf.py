"""Hugging Face `transformers` interop: export a run dir as a model dir `from_pretrained` loads, and import one.

A family (GPT-2, Llama) is declared as data: the values of our config fields it can express, how our config
becomes its config.json and back, and a weight-name map from our parameter names to its tensor names. One pair
of loops applies a map in either direction, so adding a family is adding a table, and export and import cannot
drift apart. GPT-2 stores its projections as `Conv1D`, the transpose of `nn.Linear`, and fuses q, k and v into
one `c_attn` tensor; a map row says so with `transpose` and `part`. Our own fused `qkv_proj` is cut into q, k and
v before a map is applied (`split_qkv`), and stacked again when the weights load.

Exported directories hold safetensors and JSON only (config.json, generation_config.json, tokenizer.json,
tokenizer_config.json, special_tokens_map.json): loading them needs `transformers` and nothing of ours, and
the logits equal ours. A run's chat template travels in tokenizer_config.json, and generation then also stops at
<|im_end|>; an imported model's chat template lands in the run dir's chat_template.jinja. This module does not
import `transformers` at all.

A tokenizer that puts a beginning-of-sequence token before every text (Llama 2's `<s>`, Llama 3's
`<|begin_of_text|>`) says so in its tokenizer.json post-processor, which is what transformers 5 reads. Import
records it in the run dir's tokenizer_config.json (add_bos_token and bos_token, which `Tokenizer.load` reads and
fine-tuning carries on), so that a model lmforge trained with such a tokenizer, but without that token, keeps
encoding without it. Export writes both back: the post-processor, and add_bos_token for transformers 4.

An imported tokenizer's own end-of-sequence token (Llama's `</s>`, named by config.json's eos_token_id, the
generation config or tokenizer_config.json) separates documents and stops generation, as it did for the original
model; the run dir's tokenizer_config.json names it (eos_token). Only a tokenizer with none gets `<|endoftext|>`
added, and when the embeddings have no row for it (a real model's embeddings are as many as its tokens) the
embedding table and the head grow by that row, initialised as the mean of the existing rows, so that the run can
be fine-tuned, served and exported; a model imported with no token added exports with its original vocabulary size.
Exports of decoders set padding_side left: batched generation pads before the prompt, not between it and the output.
"""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import processors

from lmforge.chat import CHAT_TEMPLATE_FILE, IM_END, load_chat_template
from lmforge.config import RunConfig
from lmforge.data.tokenizer import EOT, Tokenizer
from lmforge.errors import LMForgeError
from lmforge.model.gpt import GPT, ModelConfig, split_qkv
from lmforge.train import checkpoint

PAD = "<|pad|>"


@dataclass(frozen=True)
class Weight:
    """One row of a weight-name map. `{i}` in a name stands for the block index."""

    ours: str
    theirs: str
    transpose: bool = False  # stored as (in, out), like GPT-2's Conv1D, not nn.Linear's (out, in)
    part: int = 0  # our slice of a fused tensor, counted along its output dimension
    parts: int = 1  # how many equal slices the fused tensor holds


@dataclass(frozen=True)
class Family:
    architecture: str  # the transformers class, written to config.json's "architectures"
    model_type: str
    needs: dict[str, Any]  # our config fields and the only value of each this family expresses
    weights: tuple[Weight, ...]
    to_config: Callable[[ModelConfig], dict]  # our config -> its config.json fields
    from_config: Callable[[dict], dict]  # its config.json -> our ModelConfig fields (raises what it cannot express)
    base_prefix: str  # the base model's name prefix, which some checkpoint files leave out
    buffers: tuple[str, ...] = ()  # name suffixes of saved tensors that are not weights (masks, rope tables)


GPT2_WEIGHTS = (
    Weight("tok_emb.weight", "transformer.wte.weight"),
    Weight("pos_emb.weight", "transformer.wpe.weight"),
    Weight("blocks.{i}.attn_norm.weight", "transformer.h.{i}.ln_1.weight"),
    Weight("blocks.{i}.attn_norm.bias", "transformer.h.{i}.ln_1.bias"),
    Weight("blocks.{i}.attn.q_proj.weight", "transformer.h.{i}.attn.c_attn.weight", transpose=True, part=0, parts=3),
    Weight("blocks.{i}.attn.k_proj.weight", "transformer.h.{i}.attn.c_attn.weight", transpose=True, part=1, parts=3),
    Weight("blocks.{i}.attn.v_proj.weight", "transformer.h.{i}.attn.c_attn.weight", transpose=True, part=2, parts=3),
    Weight("blocks.{i}.attn.q_proj.bias", "transformer.h.{i}.attn.c_attn.bias", part=0, parts=3),
    Weight("blocks.{i}.attn.k_proj.bias", "transformer.h.{i}.attn.c_attn.bias", part=1, parts=3),
    Weight("blocks.{i}.attn.v_proj.bias", "transformer.h.{i}.attn.c_attn.bias", part=2, parts=3),
    Weight("blocks.{i}.attn.o_proj.weight", "transformer.h.{i}.attn.c_proj.weight", transpose=True),
    Weight("blocks.{i}.attn.o_proj.bias", "transformer.h.{i}.attn.c_proj.bias"),
    Weight("blocks.{i}.mlp_norm.weight", "transformer.h.{i}.ln_2.weight"),
    Weight("blocks.{i}.mlp_norm.bias", "transformer.h.{i}.ln_2.bias"),
    Weight("blocks.{i}.mlp.up_proj.weight", "transformer.h.{i}.mlp.c_fc.weight", transpose=True),
    Weight("blocks.{i}.mlp.up_proj.bias", "transformer.h.{i}.mlp.c_fc.bias"),
    Weight("blocks.{i}.mlp.down_proj.weight", "transformer.h.{i}.mlp.c_proj.weight", transpose=True),
    Weight("blocks.{i}.mlp.down_proj.bias", "transformer.h.{i}.mlp.c_proj.bias"),
    Weight("norm.weight", "transformer.ln_f.weight"),
    Weight("norm.bias", "transformer.ln_f.bias"),
    Weight("lm_head.weight", "lm_head.weight"),
)

LLAMA_WEIGHTS = (
    Weight("tok_emb.weight", "model.embed_tokens.weight"),
    Weight("blocks.{i}.attn_norm.weight", "model.layers.{i}.input_layernorm.weight"),
    Weight("blocks.{i}.attn.q_proj.weight", "model.layers.{i}.self_attn.q_proj.weight"),
    Weight("blocks.{i}.attn.q_proj.bias", "model.layers.{i}.self_attn.q_proj.bias"),
    Weight("blocks.{i}.attn.k_proj.weight", "model.layers.{i}.self_attn.k_proj.weight"),
    Weight("blocks.{i}.attn.k_proj.bias", "model.layers.{i}.self_attn.k_proj.bias"),
    Weight("blocks.{i}.attn.v_proj.weight", "model.layers.{i}.self_attn.v_proj.weight"),
    Weight("blocks.{i}.attn.v_proj.bias", "model.layers.{i}.self_attn.v_proj.bias"),
    Weight("blocks.{i}.attn.o_proj.weight", "model.layers.{i}.self_attn.o_proj.weight"),
    Weight("blocks.{i}.attn.o_proj.bias", "model.layers.{i}.self_attn.o_proj.bias"),
    Weight("blocks.{i}.mlp_norm.weight", "model.layers.{i}.post_attention_layernorm.weight"),
    Weight("blocks.{i}.mlp.gate_proj.weight", "model.layers.{i}.mlp.gate_proj.weight"),
    Weight("blocks.{i}.mlp.gate_proj.bias", "model.layers.{i}.mlp.gate_proj.bias"),
    Weight("blocks.{i}.mlp.up_proj.weight", "model.layers.{i}.mlp.up_proj.weight"),
    Weight("blocks.{i}.mlp.up_proj.bias", "model.layers.{i}.mlp.up_proj.bias"),
    Weight("blocks.{i}.mlp.down_proj.weight", "model.layers.{i}.mlp.down_proj.weight"),
    Weight("blocks.{i}.mlp.down_proj.bias", "model.layers.{i}.mlp.down_proj.bias"),
    Weight("norm.weight", "model.norm.weight"),
    Weight("lm_head.weight", "lm_head.weight"),
)


def refuse(hf_field: str, value: Any, wanted: str) -> LMForgeError:
    return LMForgeError(f"config.json has {hf_field}={value!r}, which lmforge cannot express; it needs {wanted}")


def gpt2_config(c: ModelConfig) -> dict:
    return {
        "n_positions": c.seq_len,
        "n_embd": c.n_embd,
        "n_layer": c.n_layer,
        "n_head": c.n_head,
        "n_inner": c.mlp_hidden,
        "activation_function": "gelu_new",  # the tanh approximation, which our gelu is
        "layer_norm_epsilon": c.norm_eps,
        "resid_pdrop": c.dropout,
        "embd_pdrop": c.dropout,
        "attn_pdrop": c.dropout,
        "scale_attn_weights": True,
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
    }


def gpt2_fields(h: dict) -> dict:
    if h.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise refuse("activation_function", h["activation_function"], "gelu_new (the tanh GELU)")
    if h.get("scale_attn_by_inverse_layer_idx") or h.get("scale_attn_weights") is False:
        raise refuse("scale_attn_by_inverse_layer_idx", True, "scores scaled by 1/sqrt(head size) only")
    if h.get("add_cross_attention"):
        raise refuse("add_cross_attention", True, "a decoder without cross-attention")
    n_embd = h.get("n_embd", 768)
    return {
        "vocab_size": h.get("vocab_size", 50257),
        "seq_len": h.get("n_positions", 1024),
        "n_layer": h.get("n_layer", 12),
        "n_head": h.get("n_head", 12),
        "n_embd": n_embd,
        "n_inner": h.get("n_inner") or 4 * n_embd,
        "pos_emb": "learned",
        "norm": "layernorm",
        "norm_eps": h.get("layer_norm_epsilon", 1e-5),
        "mlp": "gelu",
        "bias": True,
        "tie_embeddings": h.get("tie_word_embeddings", True),
        "dropout": h.get("resid_pdrop", 0.1),
    }


def llama_config(c: ModelConfig) -> dict:
    return {
        "hidden_size": c.n_embd,
        "intermediate_size": c.mlp_hidden,
        "num_hidden_layers": c.n_layer,
        "num_attention_heads": c.n_head,
        "num_key_value_heads": c.kv_heads,
        "head_dim": c.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": c.seq_len,
        "rms_norm_eps": c.norm_eps,
        "rope_theta": c.rope_theta,  # read by transformers 4.x; 5.x reads rope_parameters
        "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
        "attention_bias": c.bias,
        "mlp_bias": c.bias,
        "attention_dropout": c.dropout,
        "pretraining_tp": 1,
    }


def llama_fields(h: dict) -> dict:
    if h.get("hidden_act", "silu") != "silu":
        raise refuse("hidden_act", h["hidden_act"], "silu (SwiGLU)")
    n_embd, n_head = h.get("hidden_size", 4096), h.get("num_attention_heads", 32)
    if h.get("head_dim") not in (None, n_embd // n_head):
        raise refuse("head_dim", h["head_dim"], f"hidden_size / num_attention_heads = {n_embd // n_head}")
    rope = h.get("rope_parameters") or h.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise refuse("rope_scaling", rope_type, "plain RoPE (rope_type default)")
    if rope.get("partial_rotary_factor", h.get("partial_rotary_factor", 1.0)) != 1.0:
        raise refuse("partial_rotary_factor", rope.get("partial_rotary_factor"), "RoPE over the whole head")
    attention_bias, mlp_bias = h.get("attention_bias", False), h.get("mlp_bias", False)
    if attention_bias != mlp_bias:
        raise refuse("mlp_bias", mlp_bias, f"the same as attention_bias ({attention_bias}): one bias field")
    n_kv_head = h.get("num_key_value_heads") or n_head
    return {
        "vocab_size": h.get("vocab_size", 32000),
        "seq_len": h.get("max_position_embeddings", 2048),
        "n_layer": h.get("num_hidden_layers", 32),
        "n_head": n_head,
        "n_kv_head": 0 if n_kv_head == n_head else n_kv_head,
        "n_embd": n_embd,
        "n_inner": h.get("intermediate_size", 11008),
        "pos_emb": "rope",
        "rope_theta": float(rope.get("rope_theta", h.get("rope_theta", 10000.0))),
        "norm": "rmsnorm",
        "norm_eps": h.get("rms_norm_eps", 1e-6),
        "mlp": "swiglu",
        "bias": attention_bias,
        "tie_embeddings": h.get("tie_word_embeddings", False),
        "dropout": float(h.get("attention_dropout", 0.0)),
    }


DECODER = {"qk_norm": False, "causal": True}
GPT2 = Family(
    architecture="GPT2LMHeadModel",
    model_type="gpt2",
    needs={"pos_emb": "learned", "norm": "layernorm", "mlp": "gelu", "bias": True, "n_kv_head": 0, **DECODER},
    weights=GPT2_WEIGHTS,
    to_config=gpt2_config,
    from_config=gpt2_fields,
    base_prefix="transformer.",
    buffers=(".attn.bias", ".attn.masked_bias"),  # causal-mask buffers in older GPT-2 files
)
LLAMA = Family(
    architecture="LlamaForCausalLM",
    model_type="llama",
    needs={"pos_emb": "rope", "norm": "rmsnorm", "mlp": "swiglu", **DECODER},
    weights=LLAMA_WEIGHTS,
    to_config=llama_config,
    from_config=llama_fields,
    base_prefix="model.",
    buffers=(".rotary_emb.inv_freq",),
)
FAMILIES = (GPT2, LLAMA)


def field_values(config: ModelConfig) -> dict[str, Any]:
    """Our config's fields as a family's `needs` compares them: n_kv_head is 0 whenever it equals n_head."""
    values = dict(vars(config))
    values["n_kv_head"] = 0 if config.kv_heads == config.n_head else config.n_kv_head
    return values


def family_for(config: ModelConfig) -> Family:
    """The family that expresses config exactly, or an error naming each field the nearest family cannot take."""
    values = field_values(config)
    mismatches = {
        family.architecture: [
            (name, values[name], wanted) for name, wanted in family.needs.items() if values[name] != wanted
        ]
        for family in FAMILIES
    }
    for family in FAMILIES:
        if not mismatches[family.architecture]:
            return family
    nearest = min(FAMILIES, key=lambda family: len(mismatches[family.architecture]))
    problems = "; ".join(
        f"model.{name}={value!r} (transformers' {nearest.architecture} needs {wanted!r})"
        for name, value, wanted in mismatches[nearest.architecture]
    )
    layouts = "; ".join(
        f"{family.architecture}: " + ", ".join(f"{name}={wanted!r}" for name, wanted in family.needs.items())
        for family in FAMILIES
    )
    raise LMForgeError(f"cannot export to Hugging Face: {problems}. Exportable layouts are {layouts}")


def family_named(model_type: str) -> Family:
    for family in FAMILIES:
        if family.model_type == model_type:
            return family
    known = ", ".join(family.model_type for family in FAMILIES)
    raise LMForgeError(f"cannot import model_type {model_type!r}; lmforge imports {known}")


def expand(family: Family, n_layer: int) -> list[Weight]:
    """The family's map with `{i}` replaced by each block index."""
    rows = []
    for row in family.weights:
        if "{i}" in row.ours:
            rows += [replace(row, ours=row.ours.format(i=i), theirs=row.theirs.format(i=i)) for i in range(n_layer)]
        else:
            rows.append(row)
    return rows


def to_hf_tensors(model: GPT, family: Family) -> dict[str, torch.Tensor]:
    """Our state dict under the family's names, fused and transposed as it stores them."""
    c = model.config
    ours = split_qkv(model.state_dict(), c)  # the maps name q, k and v apiece, as most families store them
    rows = [row for row in expand(family, c.n_layer) if row.ours in ours]
    if c.tie_embeddings:  # transformers ties lm_head to the embedding itself when tie_word_embeddings is set
        rows = [row for row in rows if row.ours != "lm_head.weight"]
    unmapped = set(ours) - {row.ours for row in rows} - ({"lm_head.weight"} if c.tie_embeddings else set())
    assert not unmapped, f"{family.architecture} map lacks {sorted(unmapped)}"
    groups: dict[str, list[Weight]] = {}
    for row in rows:
        groups.setdefault(row.theirs, []).append(row)
    tensors = {}
    for name, group in groups.items():
        group.sort(key=lambda row: row.part)
        assert [row.part for row in group] == list(range(group[0].parts)), f"{name} is missing a fused part"
        tensor = torch.cat([ours[row.ours].detach() for row in group])
        tensors[name] = (tensor.t() if group[0].transpose else tensor).contiguous()
    return tensors


def from_hf_tensors(tensors: dict[str, torch.Tensor], family: Family, config: ModelConfig) -> dict[str, torch.Tensor]:
    """A state dict GPT(config) loads, from the family's tensors; every tensor must be used, and every weight found.

    Its q, k and v projections are separate tensors, as the maps name them; GPT's load_state_dict fuses them.
    """
    if not any(name.startswith(family.base_prefix) for name in tensors):  # e.g. the original GPT-2 files
        tensors = {name if name.startswith("lm_head.") else family.base_prefix + name: t for name, t in tensors.items()}
    with torch.device("meta"):
        shapes = {name: t.shape for name, t in split_qkv(GPT(config).state_dict(), config).items()}
    rows = [row for row in expand(family, config.n_layer) if row.ours in shapes]
    if config.tie_embeddings:
        rows = [row for row in rows if row.ours != "lm_head.weight"]
    state, used = {}, set()
    for row in rows:
        if row.theirs not in tensors:
            raise LMForgeError(f"the checkpoint lacks tensor {row.theirs}, which its config.json implies")
        tensor = tensors[row.theirs]
        tensor = (tensor.t() if row.transpose else tensor).chunk(row.parts)[row.part]
        if tensor.shape != shapes[row.ours]:
            raise LMForgeError(
                f"tensor {row.theirs} has shape {tuple(tensors[row.theirs].shape)}, "
                f"which does not match its config.json ({row.ours} should be {tuple(shapes[row.ours])})"
            )
        state[row.ours] = tensor.to(torch.float32).contiguous()
        used.add(row.theirs)
    if config.tie_embeddings:
        state["lm_head.weight"] = state["tok_emb.weight"]
        used.add("lm_head.weight")  # some files store the tied copy as well
    unused = sorted(name for name in tensors if name not in used and not name.endswith(family.buffers))
    if unused:
        shown = ", ".join(unused[:3]) + (" ..." if len(unused) > 3 else "")
        raise LMForgeError(f"the checkpoint has {len(unused)} tensor(s) {family.architecture} should not have: {shown}")
    return state


def read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise LMForgeError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise LMForgeError(f"{path} must hold a JSON object")
    return data


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def read_tensors(hf_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of model.safetensors, or of the shards a model.safetensors.index.json lists."""
    single, index = hf_dir / "model.safetensors", hf_dir / "model.safetensors.index.json"
    if single.is_file():
        return load_file(str(single))
    if index.is_file():
        tensors = {}
        for shard in sorted(set(read_json(index).get("weight_map", {}).values())):
            tensors.update(load_file(str(hf_dir / shard)))
        return tensors
    if (hf_dir / "pytorch_model.bin").is_file():
        raise LMForgeError(
            f"{hf_dir} holds pytorch_model.bin (a pickle), which lmforge does not load; convert it with "
            "transformers: AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)"
        )
    raise LMForgeError(f"{hf_dir} has no model.safetensors or model.safetensors.index.json")


def prepare_out(path: Path, overwrite: bool) -> Path:
    """A fresh temporary sibling of path to write into, renamed into place by `publish`."""
    if path.exists() and not path.is_dir():
        raise LMForgeError(f"{path} is a file, not a folder; choose another path")
    if path.exists() and any(path.iterdir()) and not overwrite:
        raise LMForgeError(f"{path} exists and is not empty; choose another folder or pass --overwrite")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".tmp-{path.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def publish(tmp: Path, path: Path) -> None:
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)


def export_hf(run_dir: str | Path, out_dir: str | Path, step: int | None = None, overwrite: bool = False) -> dict:
    """Write run_dir's newest checkpoint (or `step`) as a transformers model dir; returns what was written.

    GPT-2-style models become `GPT2LMHeadModel`, Llama-style ones `LlamaForCausalLM`; a variant neither can
    express is refused with the fields that stand in the way, before anything is written.
    """
    from lmforge.api import LM

    run_dir, out_dir = Path(run_dir), Path(out_dir)
    lm = LM.load(run_dir, step=step)
    c = lm.model.config
    family = family_for(c)
    tokens = special_token_ids(lm.tokenizer)
    if lm.tokenizer.vocab_size > c.vocab_size:
        raise LMForgeError(f"the tokenizer has {lm.tokenizer.vocab_size} tokens, the model only {c.vocab_size}")
    tensors = to_hf_tensors(lm.model, family)
    config = {
        "architectures": [family.architecture],
        "model_type": family.model_type,
        "vocab_size": c.vocab_size,
        "tie_word_embeddings": c.tie_embeddings,
        **family.to_config(c),
        **tokens,
        "dtype": "float32",
        "use_cache": True,
    }
    bos, eos = lm.tokenizer.bos_token, lm.tokenizer.eot_token
    special = {"bos_token": bos or eos, "eos_token": eos} | ({"pad_token": PAD} if "pad_token_id" in tokens else {})
    generation = dict(tokens)
    chat = {"chat_template": lm.chat_template} if lm.chat_template else {}
    end_of_turn = lm.tokenizer.hf.token_to_id(IM_END)
    if chat and end_of_turn is not None:  # a chat model's reply ends at <|im_end|>
        generation["eos_token_id"] = [tokens["eos_token_id"], end_of_turn]
    tmp = prepare_out(out_dir, overwrite)
    try:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        write_json(tmp / "config.json", config)
        write_json(tmp / "generation_config.json", generation)
        (tmp / "tokenizer.json").write_text(exported_tokenizer(run_dir, lm.tokenizer), encoding="utf-8")
        write_json(
            tmp / "tokenizer_config.json",
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "model_max_length": c.seq_len,
                "clean_up_tokenization_spaces": False,  # it would turn " ." into "." in character-level output
                "add_bos_token": bos is not None,  # what transformers 4 reads for Llama; 5 reads tokenizer.json
                "padding_side": "left",  # a decoder continues the prompt's last token: padding goes before it
                **special,
                **chat,
            },
        )
        write_json(tmp / "special_tokens_map.json", special)
        publish(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {
        "out_dir": str(out_dir),
        "architecture": family.architecture,
        "params": lm.model.num_params(),
        "files": sorted(p.name for p in out_dir.iterdir()),
    }


def special_token_ids(tokenizer: Tokenizer) -> dict[str, int]:
    """bos, eos and pad ids, for config.json files: eos is the token that separates documents (<|endoftext|>, or an
    imported tokenizer's own end-of-sequence token), and so is bos (it also starts each document) unless the model
    has a beginning-of-sequence token of its own."""
    eot = tokenizer.eot_id
    ids = {"bos_token_id": eot if tokenizer.bos_id is None else tokenizer.bos_id, "eos_token_id": eot}
    pad = tokenizer.hf.token_to_id(PAD)
    return ids | ({"pad_token_id": pad} if pad is not None else {})


def template_tokens(processor: dict | None) -> tuple[list[str], list[str]]:
    """The special tokens a tokenizer.json post-processor puts before and after a single text."""
    kind = (processor or {}).get("type")
    if kind == "Sequence":
        parts = [template_tokens(p) for p in processor.get("processors", [])]
        return [t for before, _ in parts for t in before], [t for _, after in parts for t in after]
    if kind in ("BertProcessing", "RobertaProcessing"):
        return [processor["cls"][0]], [processor["sep"][0]]
    if kind != "TemplateProcessing":
        return [], []
    named, single = processor.get("special_tokens", {}), processor.get("single", [])
    cut = next((i for i, piece in enumerate(single) if "Sequence" in piece), len(single))

    def tokens(pieces: list[dict]) -> list[str]:
        keys = [piece["SpecialToken"]["id"] for piece in pieces if "SpecialToken" in piece]
        return [token for key in keys for token in named.get(key, {}).get("tokens", [key])]

    return tokens(single[:cut]), tokens(single[cut + 1 :])


def original_bos(hf_dir: Path, spec: dict, tokenizer: HFTokenizer) -> tuple[str | None, list[str]]:
    """The token the original tokenizer puts before every text, or None, and notes on what lmforge leaves out.

    tokenizer.json's post-processor decides, as in transformers 5, which drops tokenizer_config.json's add_bos_token
    when there is a tokenizer.json (transformers 4 read it for Llama tokenizers; Llama's own files agree).
    """
    before, after = template_tokens(spec.get("post_processor"))
    bos, others = (before[0], before[1:] + after) if before else (None, after)
    if bos is not None and tokenizer.token_to_id(bos) is None:
        bos, others = None, [bos, *others]
    notes = []
    if others:
        notes.append(f"the tokenizer also adds {', '.join(others)} to every text; lmforge's prompts leave that out")
    path = hf_dir / "tokenizer_config.json"
    flag = read_json(path).get("add_bos_token") if path.is_file() else None
    if isinstance(flag, bool) and flag != (bos is not None):
        notes.append(
            f"tokenizer_config.json says add_bos_token={flag}, but tokenizer.json adds "
            f"{bos or 'no beginning-of-sequence token'}; lmforge follows tokenizer.json, as transformers 5 does"
        )
    return bos, notes


def exported_tokenizer(run_dir: Path, tokenizer: Tokenizer) -> str:
    """The run's tokenizer.json, with a post-processor that adds the beginning-of-sequence token exactly when our
    prompts start with one (transformers 5 reads that, not tokenizer_config.json's add_bos_token). Unchanged when it
    already does, as for the tokenizers we build and Llama's."""
    text = (run_dir / "tokenizer.json").read_text(encoding="utf-8")
    bos = tokenizer.bos_token
    if template_tokens(json.loads(text).get("post_processor")) == ([bos] if bos else [], []):
        return text
    hf = HFTokenizer.from_str(text)
    hf.post_processor = (
        processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, tokenizer.bos_id)]
        )
        if bos
        else None
    )
    return hf.to_str()


@dataclass
class ImportedTokenizer:
    text: str  # tokenizer.json for the run dir
    bos: str | None  # the token the original tokenizer puts before every text
    eos: str | None  # its own end-of-sequence token, when it has one and lacks <|endoftext|>
    notes: list[str]


def end_of_sequence(hf_dir: Path, hf_config: dict, tokenizer: HFTokenizer) -> str | None:
    """The original model's end-of-sequence token, as its config.json, generation_config.json or
    tokenizer_config.json names it (the first of a list: Llama 3 chat models end turns with the others)."""
    generation = hf_dir / "generation_config.json"
    for config in (hf_config, read_json(generation) if generation.is_file() else {}):
        ids = config.get("eos_token_id")
        for i in ids if isinstance(ids, list) else [ids]:
            if isinstance(i, int) and tokenizer.id_to_token(i) is not None:
                return tokenizer.id_to_token(i)
    path = hf_dir / "tokenizer_config.json"
    named = read_json(path).get("eos_token") if path.is_file() else None
    named = named.get("content") if isinstance(named, dict) else named
    return named if isinstance(named, str) and tokenizer.token_to_id(named) is not None else None


def import_tokenizer(hf_dir: Path, hf_config: dict, vocab_size: int) -> ImportedTokenizer:
    """The run dir's tokenizer and what it keeps of the original's special tokens, with notes on what changed.

    Documents end with the tokenizer's <|endoftext|>, else with the original model's own end-of-sequence token.
    Only a tokenizer with neither gets <|endoftext|>, added as one more special token after the existing ones: no
    existing id changes (import_hf then grows the embeddings when the new id has no row).
    """
    path = hf_dir / "tokenizer.json"
    if not path.is_file():
        raise LMForgeError(
            f"{hf_dir} has no tokenizer.json; save the fast tokenizer there with "
            "AutoTokenizer.from_pretrained(...).save_pretrained(dir)"
        )
    text = path.read_text(encoding="utf-8")
    tokenizer = HFTokenizer.from_str(text)
    size = tokenizer.get_vocab_size(with_added_tokens=True)
    if size > vocab_size:
        raise LMForgeError(f"the tokenizer in {hf_dir} has {size} tokens but the model only {vocab_size} embeddings")
    bos, notes = original_bos(hf_dir, json.loads(text), tokenizer)
    if tokenizer.token_to_id(EOT) is not None:
        return ImportedTokenizer(text, bos, None, notes)
    eos = end_of_sequence(hf_dir, hf_config, tokenizer)
    if eos is not None:
        return ImportedTokenizer(text, bos, eos, notes)
    before = tokenizer.get_vocab(with_added_tokens=True)
    tokenizer.add_special_tokens([EOT])
    assert all(tokenizer.token_to_id(token) == i for token, i in before.items()), "adding a token moved ids"
    note = (
        f"the tokenizer has no end-of-sequence token; added {EOT} as special token {tokenizer.token_to_id(EOT)} "
        "after the existing ids, which are unchanged, to end documents and generation"
    )
    return ImportedTokenizer(tokenizer.to_str(), bos, None, [note, *notes])


def grow_vocabulary(state: dict[str, torch.Tensor], config: ModelConfig, size: int) -> ModelConfig:
    """Give the embedding table (and an untied head) rows up to size, each the mean of the existing rows: a new
    token starts where the average token is, and its logit is the mean of the others' logits."""
    names = ["tok_emb.weight"] + ([] if config.tie_embeddings else ["lm_head.weight"])
    for name in names:
        table = state[name]
        state[name] = torch.cat([table, table.mean(dim=0, keepdim=True).expand(size - len(table), -1)])
    if config.tie_embeddings:
        state["lm_head.weight"] = state["tok_emb.weight"]
    return replace(config, vocab_size=size)


def import_hf(hf_dir: str | Path, run_dir: str | Path, overwrite: bool = False) -> dict:
    """Turn a local transformers model dir (GPT-2 or Llama family) into a run dir; returns what was written.

    The run dir holds config.json (preset "imported"), tokenizer.json, a tokenizer_config.json naming the
    end-of-sequence token the documents end with and the beginning-of-sequence token if the tokenizer adds one,
    the chat template if the model has one, and a weights-only checkpoint step_000000, so `LM.load(run_dir)`,
    `lmforge generate` and evaluation work on it, and fine-tuning can start from it.
    """
    hf_dir, run_dir = Path(hf_dir), Path(run_dir)
    if not (hf_dir / "config.json").is_file():
        raise LMForgeError(f"{hf_dir} is not a transformers model dir (no config.json)")
    hf_config = read_json(hf_dir / "config.json")
    family = family_named(hf_config.get("model_type", ""))
    fields = family.from_config(hf_config)
    model_config = ModelConfig(**fields)
    if ModelConfig(**{**fields, "n_inner": 0}).mlp_hidden == model_config.mlp_hidden:
        model_config = replace(model_config, n_inner=0)  # the default derivation gives the same width: keep it implicit
    state = from_hf_tensors(read_tensors(hf_dir), family, model_config)
    imported = import_tokenizer(hf_dir, hf_config, model_config.vocab_size)
    notes = list(imported.notes)
    size = HFTokenizer.from_str(imported.text).get_vocab_size(with_added_tokens=True)
    if size > model_config.vocab_size:  # the added <|endoftext|> has no embedding yet
        notes.append(
            f"the model had {model_config.vocab_size} embeddings, as many as the tokenizer's tokens; grew the "
            f"embeddings{'' if model_config.tie_embeddings else ' and the output head'} to {size} rows, the new one "
            "the mean of the others"
        )
        model_config = grow_vocabulary(state, model_config, size)
    chat_template = load_chat_template(hf_dir)
    model = GPT(model_config)
    model.load_state_dict(state, strict=True)
    tmp = prepare_out(run_dir, overwrite)
    try:
        RunConfig(model=model_config, preset="imported").save(tmp / "config.json")
        (tmp / "tokenizer.json").write_text(imported.text, encoding="utf-8")
        # Tokenizer.load reads these: the document separator, and the token prompts start with, as the original's do
        tokenizer_config = {"eos_token": imported.eos} if imported.eos is not None else {}
        if imported.bos is not None:
            tokenizer_config |= {"add_bos_token": True, "bos_token": imported.bos}
        if tokenizer_config:
            write_json(tmp / "tokenizer_config.json", tokenizer_config)
        if chat_template:
            (tmp / CHAT_TEMPLATE_FILE).write_text(chat_template, encoding="utf-8")
        checkpoint.save(tmp, 0, model, None, {"imported_from": str(hf_dir.resolve()), "tokens": 0}, keep_last=1)
        publish(tmp, run_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for note in notes:
        warnings.warn(note, stacklevel=2)
    return {
        "run_dir": str(run_dir),
        "architecture": family.architecture,
        "params": model.num_params(),
        "notes": notes,
    }
