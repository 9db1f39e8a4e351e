import hashlib
import json

import numpy as np
import pytest
import torch

from lmforge.data import corpora
from lmforge.data.clean import CleanConfig
from lmforge.data.loader import DataDir
from lmforge.data.prepare import prepare
from lmforge.data.shards import ShardWriter, TokenSplit, token_dtype
from lmforge.data.sources import decode_utf8
from lmforge.data.tokenizer import Tokenizer
from lmforge.errors import LMForgeError


def test_shards_write_and_read(tmp_path):
    dtype = token_dtype(300)
    writer = ShardWriter(tmp_path, "train", dtype, shard_tokens=7)
    writer.write(list(range(10)))
    writer.write([11, 12, 13, 14, 15])
    files = writer.close()
    assert files == ["train_000000.bin", "train_000001.bin", "train_000002.bin"]
    assert not list(tmp_path.glob("*.tmp"))
    split = TokenSplit(tmp_path, files, dtype)
    assert split.num_tokens == 15
    assert np.concatenate([np.asarray(s) for s in split.shards]).tolist() == [*range(10), 11, 12, 13, 14, 15]
    # windows of 3 tokens: 5 in shard 0 (7 tokens), 5 in shard 1 (7 tokens), none in shard 2 (1 token)
    assert split.window_starts(3).tolist() == [5, 5, 0]
    assert split.windows(np.array([0, 5, 9]), 3).tolist() == [[0, 1, 2], [7, 8, 9], [12, 13, 14]]
    assert token_dtype(70000) == np.dtype("<u4")


def test_prepare_char_corpus(char_data, corpus_file):
    meta = json.loads((char_data / "meta.json").read_text())
    text = corpus_file.read_text(encoding="utf-8")
    tok = Tokenizer.load(char_data / "tokenizer.json")
    data = DataDir(char_data)
    train = np.asarray(data.splits["train"].shards[0]).tolist()
    val = np.asarray(data.splits["val"].shards[0]).tolist()
    # one document: train is its first 90%, val the rest, each followed by end-of-text
    assert train[-1] == val[-1] == tok.eot_id
    assert tok.decode(train[:-1]) + tok.decode(val[:-1]) == text
    assert meta["splits"]["train"]["tokens"] == len(train)
    assert meta["sources"][0]["sha256"] == hashlib.sha256(corpus_file.read_bytes()).hexdigest()
    assert meta["split_rule"] == "tail of each document"
    assert max(train) < tok.vocab_size


def test_prepare_folder_splits_whole_documents_and_is_deterministic(tmp_path):
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    for i in range(20):
        (docs / ("sub" if i % 2 else "") / f"doc{i:02d}.txt").write_text(f"document number {i}\n" * 5)
    (docs / "skip.bin").write_bytes(b"\x00\x01")
    metas = [prepare([str(docs)], tmp_path / f"out{i}", progress=False, seed=3) for i in range(2)]
    assert metas[0]["splits"]["val"]["documents"] == 2
    assert metas[0]["splits"]["train"]["documents"] == 18
    assert metas[0]["sources"][0]["documents"] == 20
    for split in ("train", "val"):
        a = (tmp_path / "out0" / f"{split}_000000.bin").read_bytes()
        b = (tmp_path / "out1" / f"{split}_000000.bin").read_bytes()
        assert a == b


def test_prepare_bpe_and_existing_tokenizer(tmp_path, corpus_file):
    meta = prepare([str(corpus_file)], tmp_path / "bpe", tokenizer="bpe", vocab_size=320, progress=False)
    assert meta["tokenizer"]["kind"] == "bpe"
    assert meta["tokenizer"]["vocab_size"] == 320
    again = prepare(
        [str(corpus_file)], tmp_path / "reuse", tokenizer=str(tmp_path / "bpe" / "tokenizer.json"), progress=False
    )
    assert again["splits"] == meta["splits"]


def test_invalid_utf8_is_replaced_and_counted(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_bytes(b"good text \xff\xfe then more\n" * 10)
    assert decode_utf8(b"a\xffb") == ("a\ufffdb", 1)
    meta = prepare([str(path)], tmp_path / "out", progress=False)
    assert meta["sources"][0]["replaced_bytes"] == 20
    assert meta["cleaning"]["invalid_utf8_bytes_replaced"] == 20


def test_pydocs_corpus_is_built_in(tmp_path):
    meta = prepare(["pydocs"], tmp_path / "py", progress=False)
    assert meta["sources"][0]["documents"] > 50
    assert meta["split_rule"] == "whole documents"
    assert meta["splits"]["val"]["tokens"] > 0


def test_fetch_checks_sha256(tmp_path):
    source = tmp_path / "remote.txt"
    source.write_text("some corpus text\n")
    digest = hashlib.sha256(source.read_bytes()).hexdigest()
    dest = tmp_path / "cache" / "corpus.txt"
    assert corpora.fetch(source.as_uri(), digest, dest).read_text() == "some corpus text\n"
    dest.unlink()
    with pytest.raises(LMForgeError, match="sha256"):
        corpora.fetch(source.as_uri(), "0" * 64, dest)
    assert not dest.exists() and not list(dest.parent.iterdir())  # nothing that looks valid is left


def test_named_corpus_uses_local_copy_via_env(tmp_path, monkeypatch):
    fake = tmp_path / "not_shakespeare.txt"
    fake.write_text("nope")
    monkeypatch.setenv("LMFORGE_TINYSHAKESPEARE", str(fake))
    with pytest.raises(LMForgeError, match="sha256 differs"):
        prepare(["tinyshakespeare"], tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda p: [str(p / "missing.txt")], "not found"),
        (lambda p: [str(p / "empty.txt")], "empty"),
        (lambda p: [str(p / "emptydir")], "has no .txt, .md"),
        (lambda p: [str(p / "*.nomatch")], "matches no files"),
    ],
)
def test_bad_sources_fail_cleanly(tmp_path, setup, message):
    (tmp_path / "emptydir").mkdir()
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(LMForgeError, match=message):
        prepare(setup(tmp_path), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_existing_output_is_not_overwritten(tmp_path, corpus_file):
    out = tmp_path / "out"
    prepare([str(corpus_file)], out, progress=False)
    before = (out / "train_000000.bin").read_bytes()
    with pytest.raises(LMForgeError, match="already exists"):
        prepare([str(corpus_file)], out, progress=False, val_fraction=0.5)
    assert (out / "train_000000.bin").read_bytes() == before
    prepare([str(corpus_file)], out, progress=False, val_fraction=0.5, overwrite=True)
    assert (out / "train_000000.bin").read_bytes() != before


def test_overwrite_replaces_only_a_data_dir_never_the_input_or_other_files(tmp_path, corpus_file):
    """issue 15 item 3: --overwrite on the corpus itself, on a folder holding it, or on a folder of other files."""
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text(corpus_file.read_text())
    (folder / "notes.md").write_text("mine")
    kept = {p.name: p.read_bytes() for p in folder.iterdir()}
    for sources, out, message in [
        ([str(folder / "a.txt")], folder / "a.txt", "holds the input"),
        ([str(folder)], folder, "holds the input"),
        ([str(corpus_file)], folder, "not a data dir made by lmforge prepare"),
        ([str(corpus_file)], folder / "notes.md", "is a file, not a data dir"),
    ]:
        with pytest.raises(LMForgeError, match=message):
            prepare(sources, out, progress=False, overwrite=True)
        assert {p.name: p.read_bytes() for p in folder.iterdir()} == kept


def test_train_batches_depend_only_on_seed_and_step(char_data):
    data = DataDir(char_data)
    a = data.train_batch(5, 0, 4, 8, 16, seed=1)
    b = data.train_batch(5, 0, 4, 8, 16, seed=1)
    c = data.train_batch(6, 0, 4, 8, 16, seed=1)
    assert a[0].equal(b[0]) and not a[0].equal(c[0])
    assert a[0][:, 1:].equal(a[1][:, :-1])  # targets are inputs shifted by one
    # the two parts of a global batch of 8 are the halves of the whole batch drawn in one part
    whole = data.train_batch(5, 0, 8, 8, 16, seed=1)[0]
    assert torch.equal(torch.cat([a[0], data.train_batch(5, 1, 4, 8, 16, seed=1)[0]]), whole)


# ------------------------------------------------------------------------------------ formats, cleaning, scale


def documents_of(out, split="train"):
    """The documents of a split, decoded: shards split at the separator."""
    meta = json.loads((out / "meta.json").read_text())
    tok = Tokenizer.load(out / "tokenizer.json")
    shards = [np.fromfile(out / name, dtype=meta["dtype"]) for name in meta["splits"][split]["shards"]]
    ids = np.concatenate(shards) if shards else np.zeros(0, dtype=meta["dtype"])
    assert len(ids) == 0 or ids.max() < tok.vocab_size
    assert len(ids) == 0 or ids[-1] == tok.eot_id
    docs, start = [], 0
    for end in np.flatnonzero(ids == tok.eot_id):
        body = ids[start:end].tolist()
        assert not set(body) & (set(tok.special_ids) - {tok.unk_id})  # raw text never yields a special id
        docs.append(tok.decode(body))
        start = end + 1
    return docs


def all_documents(out):
    return documents_of(out, "train") + documents_of(out, "val")


def shard_digests(out):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir())}


DOCS = [f"Document {i}: the quick brown fox number {i} jumps.\nSecond line of {i}, café 東京 🙂.\n" for i in range(12)]


def write_formats(root, docs):
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq
    import zstandard

    lines = "".join(json.dumps({"id": i, "meta": {"body": d}}) + "\n" for i, d in enumerate(docs))
    (root / "plain.jsonl").write_text(lines, encoding="utf-8")
    with gzip.open(root / "packed.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(lines)
    (root / "packed.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines.encode("utf-8")))
    pq.write_table(pa.table({"meta": [{"body": d} for d in docs]}), root / "table.parquet")
    folder = root / "texts"
    folder.mkdir()
    for i, d in enumerate(docs):
        (folder / f"doc{i:02d}.txt").write_text(d, encoding="utf-8")


def test_every_format_gives_the_same_documents(tmp_path):
    write_formats(tmp_path, DOCS)
    reference = prepare([str(tmp_path / "texts")], tmp_path / "ref", progress=False)
    tokenizer = str(tmp_path / "ref" / "tokenizer.json")
    expected = shard_digests(tmp_path / "ref")
    assert sorted(all_documents(tmp_path / "ref")) == sorted(DOCS)
    for name in ("plain.jsonl", "packed.jsonl.gz", "packed.jsonl.zst", "table.parquet"):
        meta = prepare(
            [str(tmp_path / name)],
            tmp_path / name.replace(".", "_"),
            tokenizer=tokenizer,
            text_field="meta.body",
            progress=False,
        )
        assert meta["splits"] == reference["splits"], name
        digests = shard_digests(tmp_path / name.replace(".", "_"))
        assert {k: v for k, v in digests.items() if k.endswith(".bin")} == {
            k: v for k, v in expected.items() if k.endswith(".bin")
        }, name
        assert meta["sources"][0]["documents"] == 12 and meta["sources"][0]["kept"] == 12


def test_hf_datasets_from_disk(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "cache")
    datasets.Dataset.from_dict({"text": DOCS[:6], "n": list(range(6))}).save_to_disk(tmp_path / "saved")
    splits = {
        "train": datasets.Dataset.from_dict({"body": DOCS[:10]}),
        "test": datasets.Dataset.from_dict({"body": DOCS[10:]}),
    }
    datasets.DatasetDict(splits).save_to_disk(tmp_path / "dict")
    (tmp_path / "jsonl").mkdir()
    (tmp_path / "jsonl" / "train.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS[6:]))
    meta = prepare(
        [str(tmp_path / "saved"), f"hf:{tmp_path / 'jsonl'}@train"], tmp_path / "out", progress=False, seed=1
    )
    assert [s["documents"] for s in meta["sources"]] == [6, 6]
    assert sorted(all_documents(tmp_path / "out")) == sorted(DOCS)
    meta = prepare(
        [f"hf:{tmp_path / 'dict'}@test"], tmp_path / "test", text_field="body", val_fraction=0, progress=False
    )
    assert sorted(all_documents(tmp_path / "test")) == sorted(DOCS[10:])
    with pytest.raises(LMForgeError, match="no split 'validation'.*train, test"):
        prepare([f"hf:{tmp_path / 'dict'}@validation"], tmp_path / "x", text_field="body", progress=False)
    with pytest.raises(LMForgeError, match="no column 'text'.*body"):
        prepare([str(tmp_path / "dict")], tmp_path / "x", progress=False)
    with pytest.raises(LMForgeError, match="hf:NAME"):
        prepare(["hf:name:"], tmp_path / "x", progress=False)


def test_stdin_text_and_jsonl(tmp_path):
    import io

    meta = prepare(["-"], tmp_path / "text", stdin=io.BytesIO("".join(DOCS).encode()), progress=False)
    assert meta["sources"][0]["name"] == "-" and meta["split_rule"] == "tail of each document"
    assert "".join(documents_of(tmp_path / "text", "train") + documents_of(tmp_path / "text", "val")) == "".join(DOCS)
    lines = "".join(json.dumps({"text": d}) + "\n" for d in DOCS).encode()
    prepare(["-"], tmp_path / "jsonl", stdin=io.BytesIO(lines), stdin_format="jsonl", progress=False)
    assert sorted(all_documents(tmp_path / "jsonl")) == sorted(DOCS)
    assert not list(tmp_path.glob(".*"))  # no spool or temporary dir left behind


def test_deduplication_is_exact_after_cleaning_and_keeps_the_first(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for i, doc in enumerate(DOCS):
        (tmp_path / "a" / f"{i:02d}.txt").write_text(doc)
    (tmp_path / "a" / "99-copy.txt").write_text(DOCS[3])  # same source
    (tmp_path / "b" / "crlf.txt").write_bytes(DOCS[5].replace("\n", "\r\n").encode())  # equal once cleaned
    (tmp_path / "b" / "near.txt").write_text(DOCS[5] + ".")  # not equal: kept
    meta = prepare([str(tmp_path / "a"), str(tmp_path / "b")], tmp_path / "out", progress=False)
    a, b = meta["sources"]
    assert (a["documents"], a["kept"], a["dropped"]) == (13, 12, {"duplicate": 1})
    assert (b["documents"], b["kept"], b["dropped"]) == (2, 1, {"duplicate": 1})
    assert meta["cleaning"]["duplicates"] == 2 and meta["cleaning"]["documents_kept"] == 13
    assert sorted(all_documents(tmp_path / "out")) == sorted([*DOCS, DOCS[5] + "."])
    kept = prepare(
        [str(tmp_path / "a"), str(tmp_path / "b")], tmp_path / "all", progress=False, clean=CleanConfig(dedup=False)
    )
    assert kept["cleaning"]["documents_kept"] == 15


def test_cleaning_is_counted_per_source_and_in_total(tmp_path):
    dirty = {
        "crlf.txt": b"one\r\ntwo\r\n",
        "control.txt": "bell\x07 and zero\u200bwidth\n".encode(),
        "nfc.txt": "cafe\u0301\n".encode(),
        "spaces.txt": b"a  b   c   \n",
        "blank.txt": b"a\n\n\n\nb\n",
        "empty.txt": b"",
        "blank-only.txt": b"  \n\n\t\n",
        "short.txt": b"hi",
        "long.txt": b"x" * 500,
        "html.md": b"<p>Fish &amp; chips</p>",
    }
    for name, data in dirty.items():
        (tmp_path / "in").mkdir(exist_ok=True)
        (tmp_path / "in" / name).write_bytes(data)
    clean = CleanConfig(html=True, min_chars=3, max_chars=100)
    meta = prepare([str(tmp_path / "in")], tmp_path / "out", clean=clean, val_fraction=0, progress=False)
    cleaning = meta["cleaning"]
    assert cleaning["changed_documents"] == {
        "html": 1,
        "newlines": 1,
        "control": 1,
        "normalize": 1,
        "spaces": 2,
        "blank_lines": 2,
    }
    assert cleaning["edits"] == {"html": 3, "newlines": 2, "control": 2, "normalize": 1, "spaces": 3, "blank_lines": 2}
    assert cleaning["dropped"] == {"empty": 2, "too_long": 1, "too_short": 1}
    assert cleaning["documents_read"] == 10 and cleaning["documents_kept"] == 6
    assert cleaning["config"]["html"] is True
    source = meta["sources"][0]
    assert source["documents"] == source["kept"] + sum(source["dropped"].values())
    assert sorted(all_documents(tmp_path / "out")) == sorted(
        ["one\ntwo\n", "bell and zerowidth\n", "café\n", "a b c\n", "a\n\nb\n", "Fish & chips\n"]
    )
    assert meta["splits"]["train"]["characters"] + meta["splits"]["val"]["characters"] == source["characters"]
    off = prepare([str(tmp_path / "in")], tmp_path / "raw", clean=CleanConfig.off(), progress=False)
    assert off["cleaning"]["changed_documents"] == {} and off["cleaning"]["dropped"] == {"empty": 2}


@pytest.mark.parametrize("tokenizer", ["char", "bpe"])
def test_output_is_identical_for_any_worker_count(tmp_path, monkeypatch, tokenizer):
    from lmforge.data import prepare as prepare_module
    from lmforge.data import sources

    monkeypatch.setattr(prepare_module, "BATCH_DOCS", 3)  # many batches, so workers really interleave
    monkeypatch.setattr(sources, "PIECE_CHARS", 200)  # and the long documents travel in pieces
    write_formats(tmp_path, [d * (1 + 7 * (i % 3)) for i, d in enumerate(DOCS * 2)])
    args = [str(tmp_path / "texts"), str(tmp_path / "plain.jsonl")]
    digests = []
    for run, workers in enumerate((1, 2, 3, 2)):
        out = tmp_path / f"out{run}"
        prepare(args, out, tokenizer=tokenizer, vocab_size=300, text_field="meta.body", workers=workers, progress=False)
        digests.append(shard_digests(out))
    assert all(d == digests[0] for d in digests)
    assert sorted(digests[0]) == ["meta.json", "tokenizer.json", "train_000000.bin", "val_000000.bin"]


def test_long_document_in_pieces_encodes_like_the_whole(tmp_path, monkeypatch):
    from lmforge.data import sources

    monkeypatch.setattr(sources, "PIECE_CHARS", 1000)
    text = "".join(f"Line {i}: some words, café 東京 🙂 and numbers {i * 7919}.\n" for i in range(2000))
    (tmp_path / "book.txt").write_text(text, encoding="utf-8")
    meta = prepare([str(tmp_path / "book.txt")], tmp_path / "out", tokenizer="bpe", vocab_size=400, progress=False)
    tok = Tokenizer.load(tmp_path / "out" / "tokenizer.json")
    ids = tok.encode(text)
    cut = int(len(ids) * 0.9)
    train = np.fromfile(tmp_path / "out" / "train_000000.bin", dtype=meta["dtype"]).tolist()
    val = np.fromfile(tmp_path / "out" / "val_000000.bin", dtype=meta["dtype"]).tolist()
    assert train == ids[:cut] + [tok.eot_id] and val == ids[cut:] + [tok.eot_id]
    assert meta["splits"]["train"]["characters"] == len(tok.decode(ids[:cut]))
    assert meta["splits"]["train"]["characters"] + meta["splits"]["val"]["characters"] == len(text)


def test_tokenizer_sample_is_bounded(tmp_path):
    write_formats(tmp_path, DOCS)
    meta = prepare(
        [str(tmp_path / "texts")],
        tmp_path / "out",
        tokenizer="bpe",
        vocab_size=300,
        tokenizer_sample_bytes=200,
        progress=False,
    )
    assert meta["tokenizer"]["sample_documents"] == 3 and meta["tokenizer"]["sample_bytes"] < 300
    assert meta["cleaning"]["documents_kept"] == 12


def test_existing_tokenizer_without_endoftext_uses_its_own_separator(tmp_path):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers

    words = sorted({w for d in DOCS for w in d.split()})
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{w: i + 3 for i, w in enumerate(words)}}
    hf = HFTokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    hf.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf.add_special_tokens(["<unk>", "<s>", "</s>"])
    (tmp_path / "llama").mkdir()
    hf.save(str(tmp_path / "llama" / "tokenizer.json"))
    write_formats(tmp_path, DOCS + ["an unknown word </s> here"])
    meta = prepare([str(tmp_path / "texts")], tmp_path / "out", tokenizer=str(tmp_path / "llama"), progress=False)
    assert meta["tokenizer"]["eot_token"] == "</s>" and meta["tokenizer"]["eot_id"] == 2
    assert meta["tokenizer"]["unknown_tokens"] == 8  # an, unknown, word, <, /, s, > (/s> spelled out), here
    assert json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())["eos_token"] == "</s>"
    assert Tokenizer.load(tmp_path / "out" / "tokenizer.json").eot_id == 2
    # an unusual end token named in tokenizer_config.json
    hf.add_special_tokens(["<|doc_end|>"])
    hf.save(str(tmp_path / "llama" / "tokenizer.json"))
    (tmp_path / "llama" / "tokenizer_config.json").write_text(json.dumps({"eos_token": {"content": "<|doc_end|>"}}))
    assert Tokenizer.load(tmp_path / "llama").eot_token == "<|doc_end|>"


def test_sentencepiece_model_becomes_tokenizer_json(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    import io

    model = io.BytesIO()
    sentences = [line for d in DOCS * 3 for line in d.splitlines()]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_writer=model, vocab_size=120, minloglevel=2, hard_vocab_limit=False
    )
    (tmp_path / "m.model").write_bytes(model.getvalue())
    write_formats(tmp_path, DOCS)
    meta = prepare([str(tmp_path / "texts")], tmp_path / "out", tokenizer=str(tmp_path / "m.model"), progress=False)
    assert meta["tokenizer"]["kind"] == "unigram" and meta["tokenizer"]["eot_token"] == "</s>"
    processor = spm.SentencePieceProcessor(model_proto=model.getvalue())
    tok = Tokenizer.load(tmp_path / "out" / "tokenizer.json")
    for doc in DOCS[:3]:
        assert tok.encode(doc) == processor.encode(doc)


def test_interrupted_prepare_leaves_nothing_that_looks_complete(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    text = "".join(f"line {i} of a corpus big enough to take a moment\n" for i in range(200_000))
    (tmp_path / "big.txt").write_text(text)
    out = tmp_path / "out"
    code = (
        "import sys; from lmforge.data.prepare import prepare; "
        f"prepare([{str(tmp_path / 'big.txt')!r}], {str(out)!r}, shard_tokens=100_000, progress=False)"
    )
    process = subprocess.Popen([sys.executable, "-c", code])
    deadline = time.time() + 60
    while time.time() < deadline and not list(tmp_path.glob(".out.*.tmp/*.bin")):
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not out.exists()
    assert list(tmp_path.glob(".out.*.tmp"))  # what the killed run left, under a temporary name
    meta = prepare([str(tmp_path / "big.txt")], out, shard_tokens=100_000, progress=False)
    assert not list(tmp_path.glob(".out.*"))  # removed by the rerun
    assert len(meta["splits"]["train"]["shards"]) > 5
    prepare([str(tmp_path / "big.txt")], tmp_path / "clean", shard_tokens=100_000, progress=False)
    assert shard_digests(out) == shard_digests(tmp_path / "clean")


def test_cli_prepare_flags(tmp_path, capsys):
    from lmforge.cli import main

    write_formats(tmp_path, DOCS + [DOCS[0]])
    code = main(
        [
            "prepare",
            str(tmp_path / "plain.jsonl"),
            "--out",
            str(tmp_path / "out"),
            "--text-field",
            "meta.body",
            "--tokenizer",
            "bpe",
            "--vocab-size",
            "300",
            "--tokenizer-sample-bytes",
            "1k",
            "--workers",
            "2",
            "--no-dedup",
            "--min-chars",
            "10",
            "--normalize",
            "NFKC",
            "--quiet",
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0, printed
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["cleaning"]["config"]["normalize"] == "NFKC" and meta["cleaning"]["documents_kept"] == 13
    assert "13 kept" in printed and "documents separated by <|endoftext|>" in printed and "MB/s" in printed
    assert main(["prepare", str(tmp_path / "plain.jsonl"), "--out", str(tmp_path / "o2"), "--quiet"]) == 2
    assert "no record has a string field 'text'" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------- bad input


def test_binary_and_empty_files_are_counted_skips(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "good.txt").write_text("some good text\n" * 10)
    (tmp_path / "in" / "image.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR" + bytes(range(256)) * 40)
    (tmp_path / "in" / "empty.md").write_bytes(b"")
    meta = prepare([str(tmp_path / "in")], tmp_path / "out", progress=False)
    source = meta["sources"][0]
    assert source["dropped"] == {"binary_file": 1, "empty": 1} and source["kept"] == 1
    assert any("image.txt: binary file" in e for e in source["skipped_examples"])
    with pytest.raises(LMForgeError, match=r"corpus is empty.*1 binary file"):
        prepare([str(tmp_path / "in" / "image.txt")], tmp_path / "bin", progress=False)
    with pytest.raises(LMForgeError, match=r"corpus is empty.*1 empty"):
        prepare([str(tmp_path / "in" / "empty.md")], tmp_path / "empty", progress=False)
    assert not (tmp_path / "bin").exists() and not (tmp_path / "empty").exists()


def test_utf16_file_with_bom_is_read(tmp_path):
    (tmp_path / "w.txt").write_bytes("\ufeffWindows text, café\r\n".encode("utf-16"))
    prepare([str(tmp_path / "w.txt")], tmp_path / "out", val_fraction=0.0, progress=False)
    assert documents_of(tmp_path / "out") == ["Windows text, café\n"]


def test_invalid_utf8_policies(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "good.txt").write_text("fine text\n")
    (tmp_path / "in" / "bad.txt").write_bytes(b"broken \xff\xfe text\n")
    (tmp_path / "lines.jsonl").write_bytes(
        b'{"text": "ok"}\n{"text": "bad \xff"}\n{"text": "lone \\ud800 surrogate"}\n'
    )
    meta = prepare(
        [str(tmp_path / "in"), str(tmp_path / "lines.jsonl")], tmp_path / "r", val_fraction=0, progress=False
    )
    assert [s["replaced_bytes"] for s in meta["sources"]] == [2, 2]
    assert sorted(all_documents(tmp_path / "r")) == sorted(
        ["fine text\n", "broken \ufffd\ufffd text\n", "ok", "bad \ufffd", "lone \ufffd surrogate"]
    )
    meta = prepare(
        [str(tmp_path / "in"), str(tmp_path / "lines.jsonl")], tmp_path / "s", on_invalid="skip", progress=False
    )
    assert [s["dropped"] for s in meta["sources"]] == [{"invalid_utf8": 1}, {"invalid_utf8": 2}]
    assert meta["sources"][1]["skipped_examples"] == [
        f"{tmp_path / 'lines.jsonl'}:2: invalid utf8",
        f"{tmp_path / 'lines.jsonl'}:3: invalid utf8",
    ]
    with pytest.raises(LMForgeError, match=r"bad.txt: invalid UTF-8 at byte 7; .*--on-invalid"):
        prepare([str(tmp_path / "in")], tmp_path / "e", on_invalid="error", progress=False)
    with pytest.raises(LMForgeError, match=r"lines.jsonl:2: invalid UTF-8"):
        prepare([str(tmp_path / "lines.jsonl")], tmp_path / "e", on_invalid="error", progress=False)


def test_malformed_jsonl_lines_and_missing_fields(tmp_path):
    lines = [
        json.dumps({"text": "first"}),
        "{not json",
        json.dumps({"title": "no text here"}),
        "",
        json.dumps({"text": 42}),
        json.dumps(["not", "an", "object"]),
        json.dumps({"text": "last"}),
    ]
    path = tmp_path / "mixed.jsonl"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(LMForgeError, match=r"mixed.jsonl:2: malformed JSON \(Expecting property name.*--on-error skip"):
        prepare([str(path)], tmp_path / "e", progress=False)
    meta = prepare([str(path)], tmp_path / "s", on_error="skip", progress=False)
    source = meta["sources"][0]
    assert source["documents"] == 6 and source["kept"] == 2  # the blank line is not a document
    assert source["dropped"] == {"malformed_json": 1, "missing_field": 3}
    assert source["skipped_examples"][0] == f"{path}:2: malformed json"
    (tmp_path / "other.jsonl").write_text(json.dumps({"body": "x", "id": 1}) + "\n")
    with pytest.raises(LMForgeError, match=r"no record has a string field 'text' \(the first record has body, id\)"):
        prepare([str(tmp_path / "other.jsonl")], tmp_path / "m", progress=False)
    with pytest.raises(LMForgeError, match=r"--text-field"):
        prepare([str(path)], tmp_path / "m", text_field="a..b", progress=False)


def test_parquet_without_the_column_and_corrupt_files(tmp_path):
    import gzip

    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"content": ["a", "b"], "id": [1, 2]}), tmp_path / "t.parquet")
    with pytest.raises(LMForgeError, match=r"t.parquet has no column 'text' \(columns: content, id\); .*--text-field"):
        prepare([str(tmp_path / "t.parquet")], tmp_path / "o", progress=False)
    (tmp_path / "fake.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(LMForgeError, match=r"cannot read .*fake.parquet as Parquet"):
        prepare([str(tmp_path / "fake.parquet")], tmp_path / "o", progress=False)
    data = gzip.compress("".join(json.dumps({"text": f"doc {i}"}) + "\n" for i in range(2000)).encode())
    (tmp_path / "cut.jsonl.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(LMForgeError, match=r"cut.jsonl.gz: cannot read .*--on-error skip"):
        prepare([str(tmp_path / "cut.jsonl.gz")], tmp_path / "o", progress=False)
    meta = prepare([str(tmp_path / "cut.jsonl.gz")], tmp_path / "o", on_error="skip", progress=False)
    assert meta["sources"][0]["dropped"] == {"unreadable_file": 1} and meta["sources"][0]["kept"] > 10
    assert not (tmp_path / "o" / "missing").exists()


def test_folders_without_text(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "image.png").write_bytes(b"\x89PNG")
    (tmp_path / "data" / ".hidden.txt").write_text("hidden")
    with pytest.raises(LMForgeError, match="has no .txt, .md, .jsonl"):
        prepare([str(tmp_path / "data")], tmp_path / "o", progress=False)
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "a.txt").write_text("   \n")
    (tmp_path / "blank" / "b.md").write_text("")
    with pytest.raises(LMForgeError, match=r"corpus is empty.*2 document\(s\) read, dropped: 2 empty"):
        prepare([str(tmp_path / "blank")], tmp_path / "o", progress=False)


def test_a_50_megabyte_line(tmp_path):
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    words = ["the", "cat", "sat", "on", "mat"]
    hf = HFTokenizer(
        models.WordLevel({"<|endoftext|>": 0, "<unk>": 1, **{w: i + 2 for i, w in enumerate(words)}}, "<unk>")
    )
    hf.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf.decoder = decoders.WordPiece()
    hf.add_special_tokens(["<|endoftext|>"])
    hf.save(str(tmp_path / "words.json"))
    line = "the cat sat on the mat " * 2_200_000  # 50.6 MB, no newline
    (tmp_path / "line.txt").write_text(line)
    (tmp_path / "line.jsonl").write_text('{"text": "short doc"}\n{"text": "' + line + "}\n")  # unterminated
    meta = prepare(
        [str(tmp_path / "line.txt"), str(tmp_path / "line.jsonl")],
        tmp_path / "out",
        tokenizer=str(tmp_path / "words.json"),
        on_error="skip",
        workers=2,
        val_fraction=0,
        progress=False,
    )
    assert meta["sources"][0]["kept"] == 1 and meta["sources"][1]["dropped"] == {"malformed_json": 1}
    assert meta["splits"]["train"]["tokens"] + meta["splits"]["val"]["tokens"] == 6 * 2_200_000 + 1 + 2 + 1
