import hashlib
import json

import numpy as np
import pytest
import torch

from lmforge.data import corpora
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
        (lambda p: [str(p / "emptydir")], "no .txt or .md"),
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
