"""pretrain prepare and TokenLoader: round trips, determinism, resume, sharding over ranks, errors."""

import json
import os
import shutil
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_tiny_corpus
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from pretrain.data import (
    CHECKSUM,
    FALLBACK_CHECKSUM,
    TokenLoader,
    default_checksum,
    default_corpus_files,
    load_manifest,
    prepare_dataset,
    read_shard,
)
from pretrain.errors import UserError
from pretrain.tokenizer import EOS_TOKEN, SPECIAL_TOKENS, load_tokenizer, train_tokenizer

ROOT = Path(__file__).resolve().parents[1]
QUIET = {"log": lambda *a: None}
TRICKY = "Literal <|endoftext|> and <|user|> inside a document, ünïcödé, 中文, emoji 🙂.\n"


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> list[Path]:
    files = write_tiny_corpus(tmp_path_factory.mktemp("corpus") / "docs", num_docs=120, seed=1)
    files[7].write_text(TRICKY, encoding="utf-8")
    return files


@pytest.fixture(scope="session")
def sharded(tmp_path_factory, corpus) -> Path:
    """The corpus in many small shards, so windows cross shard boundaries."""
    out = tmp_path_factory.mktemp("sharded") / "data"
    prepare_dataset(
        out,
        [str(corpus[0].parent)],
        vocab_size=400,
        val_fraction=0.1,
        shard_tokens=1500,
        num_proc=2,
        **QUIET,
    )
    return out


def documents(data_dir: Path, split: str) -> list[np.ndarray]:
    """Every document's tokens (with its trailing EOS), in shard order."""
    m = load_manifest(data_dir)
    docs = []
    for shard in m.split_shards(split):
        tokens, starts = read_shard(shard.path)
        docs += [np.array(tokens[a:b]) for a, b in zip(starts[:-1], starts[1:])]
    return docs


def split_tokens(data_dir: Path, split: str) -> np.ndarray:
    return np.concatenate(documents(data_dir, split)).astype(np.int64)


def rows(batches) -> list[tuple]:
    return [tuple(r) for b in batches for r in torch.cat([b.inputs, b.targets[:, -1:]], 1).tolist()]


# --- prepare -------------------------------------------------------------------------------------


def test_decoding_shards_gives_back_the_documents(sharded, corpus):
    m = load_manifest(sharded)
    tok = load_tokenizer(m.tokenizer_path)
    decoded = {
        split: [
            tok.decode(d[:-1].tolist(), skip_special_tokens=False)
            for d in documents(sharded, split)
        ]
        for split in ("train", "val")
    }
    originals = [p.read_text(encoding="utf-8") for p in corpus]
    # Each split keeps input order; together they are the corpus, with no document in both.
    assert sorted(decoded["train"] + decoded["val"]) == sorted(originals)
    assert decoded["train"] == [t for t in originals if t in set(decoded["train"])]
    assert not set(decoded["train"]) & set(decoded["val"])
    assert TRICKY in decoded["train"] + decoded["val"]
    # EOS ends every document and appears nowhere else, even where the text spells it out.
    for split in ("train", "val"):
        for d in documents(sharded, split):
            assert d[-1] == m.eos_id and (d[:-1] != m.eos_id).all()
    assert m.eos_id == tok.token_to_id(EOS_TOKEN)
    assert set(m.special_tokens) == set(SPECIAL_TOKENS)
    assert len(m.split_shards("train")) > 3  # the loader tests below cross shard boundaries


def test_manifest_counts_match_shards(sharded, corpus):
    m = load_manifest(sharded)
    assert m.vocab_size == 400 and m.token_dtype == "uint16"
    assert m.num_docs("train") + m.num_docs("val") == len(corpus)
    total_bytes = sum(len(p.read_bytes()) for p in corpus)
    assert m.num_bytes("train") + m.num_bytes("val") == total_bytes
    for split in ("train", "val"):
        assert m.num_tokens(split) == len(split_tokens(sharded, split))
    raw = json.loads((sharded / "manifest.json").read_text())
    assert raw["tokenizer_sha256"] and all(
        s["checksum"].startswith("xxh3_64:") for s in raw["shards"]
    )
    assert not list(sharded.parent.glob(".*tmp*"))  # the temporary directory was renamed away


def test_prepare_is_deterministic_and_idempotent(tmp_path, corpus, sharded):
    out = tmp_path / "again"
    args = dict(vocab_size=400, val_fraction=0.1, shard_tokens=1500, **QUIET)
    prepare_dataset(out, [str(corpus[0].parent)], **args)
    assert (out / "manifest.json").read_text() != ""
    a, b = load_manifest(out), load_manifest(sharded)
    assert [s.checksum for s in a.shards] == [s.checksum for s in b.shards]
    assert a.tokenizer_sha256 == b.tokenizer_sha256
    before = (out / "manifest.json").stat().st_mtime_ns
    logged = []
    prepare_dataset(out, [str(corpus[0].parent)], **{**args, "log": logged.append})
    assert "up to date" in logged[0] and (out / "manifest.json").stat().st_mtime_ns == before


def test_existing_tokenizer_and_parallel_workers_give_the_same_tokens(tmp_path, sharded, corpus):
    out = tmp_path / "reuse"
    prepare_dataset(
        out,
        [str(corpus[0].parent)],
        tokenizer=sharded / "tokenizer.json",
        val_fraction=0.1,
        num_proc=1,  # the fixture used two worker processes
        **QUIET,
    )
    assert load_manifest(out).tokenizer_sha256 == load_manifest(sharded).tokenizer_sha256
    for split in ("train", "val"):
        assert np.array_equal(split_tokens(out, split), split_tokens(sharded, split))


def test_jsonl_input_with_undecodable_bytes_is_replaced_and_counted(tmp_path):
    good = json.dumps({"content": "hello world " * 20}).encode()
    bad = b'{"content": "caf\xe9 ol\xff\xfe pretrain"}'
    (tmp_path / "a.jsonl").write_bytes(
        good + b"\n" + bad + b"\n" + good.replace(b"hello", b"bye") + b"\n"
    )
    (tmp_path / "b.txt").write_bytes(b"plain \xff text file\n" * 30)
    out = tmp_path / "out"
    logged = []
    m = prepare_dataset(
        out,
        [str(tmp_path / "a.jsonl"), str(tmp_path / "*.txt")],
        text_field="content",
        vocab_size=300,
        val_fraction=0.0,
        log=logged.append,
    )
    stats = m.raw["stats"]
    assert stats["documents"] == {"train": 4, "val": 0}
    assert stats["replacement_chars"] == 3 + 30 and stats["documents_with_replacements"] == 2
    assert any("33 undecodable bytes were replaced" in line for line in logged)
    tok = load_tokenizer(m.tokenizer_path)
    assert (
        tok.decode(documents(out, "train")[1][:-1].tolist()) == "caf\ufffd ol\ufffd\ufffd pretrain"
    )


def bad_prepare(tmp_path, inputs, **kwargs) -> str:
    out = tmp_path / "out"
    with pytest.raises(UserError) as e:
        prepare_dataset(out, inputs, **{"vocab_size": 300, **QUIET, **kwargs})
    assert "\n" not in str(e.value)
    assert not out.exists() or (out / "keep").exists()  # nothing half-written looks complete
    assert not list(tmp_path.glob(".out.tmp*"))
    return str(e.value)


def test_bad_inputs_are_one_line_errors(tmp_path, corpus, sharded):
    missing = str(tmp_path / "missing.txt")
    assert "not found" in bad_prepare(tmp_path, [missing]) and missing in bad_prepare(
        tmp_path, [missing]
    )
    (tmp_path / "empty.txt").write_text("")
    assert "empty" in bad_prepare(tmp_path, [str(tmp_path / "empty.txt")])
    assert "matches no files" in bad_prepare(tmp_path, [str(tmp_path / "nothing-*.jsonl")])
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "a.jsonl").write_text('{"text": ""}\n{"text": null}\n')
    assert "hold no text" in bad_prepare(tmp_path, [str(tmp_path / "blank")])
    assert "no field 'body'" in bad_prepare(tmp_path, [str(tmp_path / "blank")], text_field="body")
    assert "too small" in bad_prepare(tmp_path, [str(corpus[0])], vocab_size=260)
    (tmp_path / "broken.json").write_text('{"model": ')
    err = bad_prepare(
        tmp_path, [str(corpus[0])], vocab_size=None, tokenizer=tmp_path / "broken.json"
    )
    assert "does not parse" in err and "broken.json" in err
    no_eos = Tokenizer(models.BPE())
    no_eos.pre_tokenizer = pre_tokenizers.ByteLevel()
    no_eos.train_from_iterator(["some text"], trainers.BpeTrainer(vocab_size=300))
    no_eos.save(str(tmp_path / "no-eos.json"))
    err = bad_prepare(
        tmp_path, [str(corpus[0])], vocab_size=None, tokenizer=tmp_path / "no-eos.json"
    )
    assert EOS_TOKEN in err


def test_a_failure_midway_leaves_nothing(tmp_path):
    rows = [json.dumps({"text": f"document number {i} " * 5}) for i in range(50)]
    (tmp_path / "data.jsonl").write_text("\n".join(rows + ['{"text": 42}']) + "\n")
    assert "holds int" in bad_prepare(tmp_path, [str(tmp_path / "data.jsonl")], val_fraction=0.0)


def test_output_dir_holding_another_dataset_is_refused_unless_overwrite(tmp_path, corpus):
    out = tmp_path / "out"
    inputs = [str(p) for p in corpus[:20]]
    prepare_dataset(out, inputs, vocab_size=300, **QUIET)
    (out / "keep").write_text("marker")
    err = bad_prepare(tmp_path, inputs[:10])
    assert "different dataset" in err and "--overwrite" in err
    assert (out / "keep").exists()
    m = prepare_dataset(out, inputs[:10], vocab_size=300, overwrite=True, **QUIET)
    assert m.num_docs("train") + m.num_docs("val") == 10 and not (out / "keep").exists()
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not a prepared dataset"):
        prepare_dataset(other, inputs, vocab_size=300, **QUIET)


def test_default_corpus_is_the_sorted_stdlib():
    files = default_corpus_files()
    assert len(files) > 300 and sum(f.stat().st_size for f in files) > 4_000_000
    assert all(f.suffix == ".py" and "site-packages" not in f.parts for f in files)
    assert any(f.name == "argparse.py" for f in files)
    assert files == sorted(files, key=lambda p: p.as_posix())


def test_cli_prepare_and_one_line_error(tmp_path, corpus):
    cmd = [sys.executable, "-m", "pretrain.cli", "prepare", "--out", str(tmp_path / "d")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ok = subprocess.run(
        [*cmd, "--input", str(corpus[0].parent / "doc-00*.txt"), "--vocab-size", "300"],
        capture_output=True, text=True, cwd=ROOT, env=env,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "d" / "manifest.json").exists() and "wrote" in ok.stdout
    bad = subprocess.run(
        [*cmd, "--vocab-size", "100"], capture_output=True, text=True, cwd=ROOT, env=env
    )
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0 and "--vocab-size 100 is too small" in bad.stderr
    hub = subprocess.run(
        [*cmd[:-1], str(tmp_path / "d2"), "--input", "no-such-user/no-such-dataset"],
        capture_output=True, text=True, cwd=ROOT, env={**env, "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    assert hub.returncode == 2 and not (tmp_path / "d2").exists()
    assert "could not load the Hugging Face dataset no-such-user/no-such-dataset" in hub.stderr


@pytest.mark.slow
def test_cli_prepares_the_default_corpus(tmp_path):
    out = tmp_path / "stdlib"
    cmd = [
        sys.executable,
        "-m",
        "pretrain.cli",
        "prepare",
        "--out",
        str(out),
        "--vocab-size",
        "8192",
    ]
    subprocess.run(cmd, check=True, cwd=ROOT)
    m = load_manifest(out)
    assert m.vocab_size == 8192 and m.num_tokens("train") > 1_000_000 and m.num_docs("val") > 0
    tok = load_tokenizer(m.tokenizer_path)
    decoded = {tok.decode(d[:-1].tolist()) for s in ("train", "val") for d in documents(out, s)}
    originals = {p.read_text(encoding="utf-8") for p in default_corpus_files()} - {""}
    assert decoded == originals


# --- loader --------------------------------------------------------------------------------------


def take(loader, n):
    return [next(loader) for _ in range(n)]


def test_batches_are_shifted_windows_of_the_split(sharded):
    T = 32
    loader = TokenLoader(sharded, seq_len=T, batch_size=8, seed=3)
    tokens = split_tokens(sharded, "train")
    assert loader.num_windows == (len(tokens) - 1) // T
    windows = Counter(tuple(tokens[j * T : j * T + T + 1]) for j in range(loader.num_windows))
    batch = next(loader)
    assert batch.inputs.dtype == batch.targets.dtype == torch.int64
    assert batch.inputs.shape == batch.targets.shape == (8, T) and batch.doc_ids is None
    assert torch.equal(batch.inputs[:, 1:], batch.targets[:, :-1])
    assert all(r in windows for r in rows([batch]))


def test_every_window_once_per_epoch_over_two_ranks_and_two_workers(sharded):
    T, G = 16, 8
    loaders = [
        TokenLoader(sharded, seq_len=T, batch_size=G, rank=r, world_size=2, seed=5, num_workers=2)
        for r in range(2)
    ]
    M = loaders[0].num_windows
    tokens = split_tokens(sharded, "train")
    expected = Counter(tuple(tokens[j * T : j * T + T + 1]) for j in range(M))
    n_batches = -(-M // G) + 1
    per_rank = [take(loader, n_batches) for loader in loaders]
    stream = []
    for k in range(n_batches):  # the global batch k: rank 0's rows, then rank 1's
        stream += rows([per_rank[0][k]]) + rows([per_rank[1][k]])
    assert Counter(stream[:M]) == expected
    assert Counter(stream[M : 2 * M]) != Counter() and stream[M : M + G] != stream[:G]  # reshuffled
    for loader in loaders:
        loader.close()


def test_two_ranks_consume_the_one_rank_stream(sharded):
    kwargs = dict(seq_len=24, batch_size=6, seed=11)
    single = rows(take(TokenLoader(sharded, **kwargs), 5))
    r0, r1 = (TokenLoader(sharded, rank=r, world_size=2, **kwargs) for r in range(2))
    merged = []
    for b0, b1 in zip(take(r0, 5), take(r1, 5)):
        merged += rows([b0]) + rows([b1])
    assert merged == single


def test_resume_is_exact_across_workers_and_world_sizes(sharded):
    kwargs = dict(seq_len=24, batch_size=6, seed=7)
    reference = rows(take(TokenLoader(sharded, **kwargs), 9))

    first = TokenLoader(sharded, num_workers=2, **kwargs)
    seen = rows(take(first, 4))
    state = first.state_dict()
    first.close()
    assert state["position"] == 24 and state["seed"] == 7
    resumed = TokenLoader(sharded, **{**kwargs, "seed": 99})  # the state's seed wins
    resumed.load_state_dict(json.loads(json.dumps(state)))  # the state survives JSON
    assert seen + rows(take(resumed, 5)) == reference

    # Two ranks for three batches, then one rank (and back to three ranks) continue the stream.
    two = [TokenLoader(sharded, rank=r, world_size=2, **kwargs) for r in range(2)]
    per_rank = [take(loader, 3) for loader in two]
    stream = []
    for k in range(3):
        stream += rows([per_rank[0][k]]) + rows([per_rank[1][k]])
    one = TokenLoader(sharded, **kwargs)
    one.load_state_dict(two[1].state_dict())
    stream += rows(take(one, 3))
    three = [
        TokenLoader(sharded, rank=r, world_size=3, num_workers=r % 2, **kwargs) for r in range(3)
    ]
    batches = []
    for loader in three:
        loader.load_state_dict(one.state_dict())
        batches.append(take(loader, 3))
    for k in range(3):
        stream += rows([batches[0][k]]) + rows([batches[1][k]]) + rows([batches[2][k]])
    assert stream == reference
    for loader in three:
        loader.close()


def test_doc_ids_restart_after_each_end_of_text(sharded):
    m = load_manifest(sharded)
    loader = TokenLoader(sharded, seq_len=64, batch_size=8, seed=1, return_doc_ids=True)
    batch = next(loader)
    assert batch.doc_ids.dtype == torch.int64 and batch.doc_ids.shape == (8, 64)
    is_eos = (batch.inputs == m.eos_id).long()
    expected = torch.cumsum(is_eos, 1) - is_eos  # a document's EOS belongs to it
    assert torch.equal(batch.doc_ids, expected) and batch.doc_ids.max() > 0


def test_val_loader_is_deterministic(sharded):
    def first_batches():
        return rows(take(TokenLoader(sharded, split="val", seq_len=16, batch_size=4, seed=1), 3))

    assert first_batches() == first_batches()
    tokens = split_tokens(sharded, "val")
    windows = {tuple(tokens[j * 16 : j * 16 + 17]) for j in range((len(tokens) - 1) // 16)}
    assert set(first_batches()) <= windows


def test_tiny_dataset_fixture(tiny_dataset):
    m = load_manifest(tiny_dataset)
    assert m.vocab_size == 512 and m.num_tokens("val") > 0
    next(TokenLoader(tiny_dataset, seq_len=64, batch_size=4))


def test_loader_errors_name_the_problem(tmp_path, sharded):
    with pytest.raises(UserError, match="not divisible by the world size 4"):
        TokenLoader(sharded, seq_len=8, batch_size=6, world_size=4)
    with pytest.raises(UserError, match="longer than the data"):
        TokenLoader(sharded, split="val", seq_len=10**6, batch_size=2)
    with pytest.raises(UserError, match=f"data directory {tmp_path / 'nope'} not found"):
        TokenLoader(tmp_path / "nope", seq_len=8, batch_size=2)
    with pytest.raises(UserError, match="manifest.json not found"):
        TokenLoader(tmp_path, seq_len=8, batch_size=2)
    with pytest.raises(UserError, match="another dataset"):
        TokenLoader(sharded, seq_len=8, batch_size=2).load_state_dict(
            {**TokenLoader(sharded, split="val", seq_len=8, batch_size=2).state_dict()}
        )


def test_corrupted_shards_are_refused(tmp_path, sharded):
    data = tmp_path / "data"
    shutil.copytree(sharded, data)
    TokenLoader(data, seq_len=8, batch_size=2)  # verified once: the cache must not hide changes
    shard = data / "train-00001.bin"
    raw = bytearray(shard.read_bytes())
    raw[100] ^= 0xFF
    shard.write_bytes(raw)
    with pytest.raises(UserError, match=r"train-00001.bin has checksum xxh3_64:\w+, expected"):
        TokenLoader(data, seq_len=8, batch_size=2)
    shard.write_bytes(raw[:-10])
    with pytest.raises(
        UserError, match=rf"train-00001.bin is {len(raw) - 10} bytes, expected {len(raw)}"
    ):
        TokenLoader(data, seq_len=8, batch_size=2)
    shard.unlink()
    with pytest.raises(UserError, match="train-00001.bin listed in manifest.json is missing"):
        TokenLoader(data, seq_len=8, batch_size=2)


def test_hashlib_checksummed_dataset_verifies_and_detects_corruption(tmp_path, corpus, sharded):
    data = tmp_path / "blake"
    prepare_dataset(
        data, [str(corpus[0].parent)], vocab_size=300, val_fraction=0.1, shard_tokens=3000,
        num_proc=1, checksum=FALLBACK_CHECKSUM, log=lambda *a: None,
    )  # fmt: skip
    raw = json.loads((data / "manifest.json").read_text())
    assert raw["checksum_algorithm"] == FALLBACK_CHECKSUM
    assert all(s["checksum"].startswith(f"{FALLBACK_CHECKSUM}:") for s in raw["shards"])
    assert len(raw["shards"]) > 2
    assert raw["stats"]["documents"]["train"] + raw["stats"]["documents"]["val"] == len(corpus)
    assert len(take(TokenLoader(data, seq_len=8, batch_size=2), 3)) == 3
    shard = data / "train-00001.bin"
    corrupted = bytearray(shard.read_bytes())
    corrupted[100] ^= 0xFF
    shard.write_bytes(corrupted)
    with pytest.raises(UserError, match=rf"train-00001.bin has checksum {FALLBACK_CHECKSUM}:\w+, "):
        TokenLoader(data, seq_len=8, batch_size=2)


def test_without_xxhash_datasets_fall_back_and_xxh3_ones_ask_for_it(tmp_path, sharded, monkeypatch):
    old = tmp_path / "old"
    shutil.copytree(sharded, old)
    manifest = json.loads((old / "manifest.json").read_text())
    assert manifest.pop("checksum_algorithm") == CHECKSUM
    (old / "manifest.json").write_text(json.dumps(manifest))  # as written before the field
    TokenLoader(old, seq_len=8, batch_size=2)

    monkeypatch.setitem(sys.modules, "xxhash", None)  # `import xxhash` raises ImportError
    assert default_checksum() == FALLBACK_CHECKSUM
    fresh = tmp_path / "fresh"  # new files, not yet verified in this process
    shutil.copytree(sharded, fresh)
    with pytest.raises(UserError, match=r"train-00000.bin: xxh3_64 checksums need the xxhash "):
        TokenLoader(fresh, seq_len=8, batch_size=2)


# --- what verification refuses: a swapped tokenizer, ids past the vocabulary --------------------


def copy_dataset(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def edit_manifest(data: Path, **changes) -> dict:
    manifest = json.loads((data / "manifest.json").read_text())
    manifest.update(changes)
    (data / "manifest.json").write_text(json.dumps(manifest))
    return manifest


def largest_id(data: Path) -> int:
    return int(max(np.asarray(read_shard(s.path)[0]).max() for s in load_manifest(data).shards))


def test_a_tokenizer_other_than_the_manifests_is_refused(tmp_path, sharded):
    data = copy_dataset(sharded, tmp_path / "data")
    expected = load_manifest(data).tokenizer_sha256
    tok = load_tokenizer(data / "tokenizer.json")
    tok.add_tokens(["an extra token"])  # still a valid tokenizer.json, but not the data's
    tok.save(str(data / "tokenizer.json"))
    for attempt in (
        lambda: load_manifest(data),
        lambda: TokenLoader(data, seq_len=8, batch_size=2),
    ):
        with pytest.raises(UserError) as e:
            attempt()
        message = str(e.value)
        assert "\n" not in message and str(data / "tokenizer.json") in message
        assert f"tokenizer_sha256 {expected}" in message
        assert "restore" in message and "re-run pretrain prepare" in message
    shutil.copyfile(sharded / "tokenizer.json", data / "tokenizer.json")  # restored: accepted
    TokenLoader(data, seq_len=8, batch_size=2)


def test_manifest_records_each_shards_largest_token_id(sharded):
    for shard in load_manifest(sharded).shards:
        assert shard.max_token_id == int(np.asarray(read_shard(shard.path)[0]).max())


def test_token_ids_at_or_past_the_vocabulary_are_refused(tmp_path, sharded, monkeypatch):
    data = copy_dataset(sharded, tmp_path / "data")
    top = largest_id(data)
    edit_manifest(data, vocab_size=top)  # the ids go one past what the manifest claims
    with pytest.raises(UserError) as e:
        TokenLoader(data, seq_len=8, batch_size=2)
    message = str(e.value)
    assert "\n" not in message and "train-0000" in message
    assert f"holds token id {top}, but manifest.json gives vocab_size {top}" in message

    # An edited max_token_id does not hide the ids: verification reads them from the shard.
    manifest = edit_manifest(data, vocab_size=top + 1)
    for shard in manifest["shards"]:
        shard["max_token_id"] = 5
    (data / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=r"holds ids up to \d+, but manifest.json records max_"):
        TokenLoader(data, seq_len=8, batch_size=2)
    for shard in manifest["shards"]:
        del shard["max_token_id"]  # as manifests from before the field: still checked
    manifest["vocab_size"] = top
    (data / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=f"holds token id {top}, but"):
        TokenLoader(data, seq_len=8, batch_size=2)

    # The largest id is computed with the checksum, once per file and process.
    import pretrain.data.format as data_module

    edit_manifest(data, vocab_size=top + 1)
    fresh = copy_dataset(data, tmp_path / "fresh")  # new files: not verified in this process yet
    scans = []
    real_scan = data_module.scan_shard
    monkeypatch.setattr(data_module, "scan_shard", lambda *a: scans.append(a) or real_scan(*a))
    TokenLoader(fresh, seq_len=8, batch_size=2)
    TokenLoader(fresh, seq_len=8, batch_size=2)
    assert len(scans) == len(load_manifest(fresh).split_shards("train"))


@pytest.mark.parametrize("defect", ["swapped tokenizer", "ids past the vocabulary"])
def test_trainer_refuses_bad_data_before_it_trains(tmp_path, tiny_dataset, defect):
    from train_helpers import run_train

    data = copy_dataset(tiny_dataset, tmp_path / "data")
    vocab = load_manifest(data).vocab_size
    if defect == "swapped tokenizer":
        tok = load_tokenizer(data / "tokenizer.json")
        tok.add_tokens(["an extra token"])
        tok.save(str(data / "tokenizer.json"))
        expected = "tokenizer.json has sha256"
    else:
        vocab = largest_id(data)
        edit_manifest(data, vocab_size=vocab)
        expected = f"holds token id {vocab}, but manifest.json gives vocab_size {vocab}"
    run = tmp_path / "run"
    proc = run_train(data, run, "--model.vocab_size", str(vocab), "--train.steps", "2",
                     "--checkpoint.every", "1", check=False)  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and expected in lines[0], proc.stderr[-3000:]
    assert not list(run.glob("checkpoints/step-*"))  # nothing trained, no tokenizer copied


# --- long documents -----------------------------------------------------------------------------


def stdlib_text(chars: int) -> str:
    """Real, varied text (code, prose in docstrings, numbers, punctuation) from the stdlib."""
    parts, size = [], 0
    for path in default_corpus_files():
        parts.append(path.read_text(encoding="utf-8", errors="replace"))
        size += len(parts[-1])
        if size >= chars:
            break
    return "".join(parts)[:chars]


@pytest.fixture(scope="module")
def stdlib_tokenizer():
    return train_tokenizer([stdlib_text(400_000)], 1024)


def test_a_long_document_split_into_pieces_encodes_to_the_same_ids(stdlib_tokenizer):
    from pretrain.data.tokenize import (
        PIECE_CHARS,
        _encode_documents,
        _make_encoder,
        split_long_text,
    )

    code = stdlib_text(700_000)
    doc = (
        code
        + " ".join(code[:150_000].split())  # one line of words
        + "漢字と句読点、空白なし。" * 8000  # no spaces at all: cut at punctuation
        + "12345abc" * 4000  # letters and numbers alternating
    )
    assert len(doc) > 900_000
    pieces = split_long_text(doc)
    assert "".join(pieces) == doc and len(pieces) > len(doc) // PIECE_CHARS
    assert max(map(len, pieces)) <= PIECE_CHARS
    tokenizer = _make_encoder(stdlib_tokenizer.to_str())
    whole = tokenizer.encode(doc, add_special_tokens=False).ids
    assert [i for p in pieces for i in tokenizer.encode(p, add_special_tokens=False).ids] == whole
    eos = stdlib_tokenizer.token_to_id(EOS_TOKEN)
    short = ["a normal document", code[:PIECE_CHARS]]
    assert all(split_long_text(t) == [t] for t in short)
    flat, lengths = _encode_documents(
        tokenizer, [short[0], doc, short[1]], eos, np.uint16, PIECE_CHARS
    )
    expected = [tokenizer.encode(t, add_special_tokens=False).ids + [eos] for t in short]
    expected.insert(1, whole + [eos])
    assert flat.tolist() == [i for ids in expected for i in ids]
    assert lengths == [len(ids) for ids in expected]


def test_prepare_encodes_long_and_normal_documents_as_the_tokenizer_does(tmp_path, corpus):
    long_doc = tmp_path / "long.txt"
    long_doc.write_text(" ".join(stdlib_text(400_000).split()), encoding="utf-8")  # one line
    out = tmp_path / "out"
    inputs = [str(p) for p in corpus[:40]] + [str(long_doc)]
    m = prepare_dataset(out, inputs, vocab_size=400, val_fraction=0.0, num_proc=2, **QUIET)
    tok = load_tokenizer(m.tokenizer_path)
    tok.encode_special_tokens = True
    texts = [Path(p).read_text(encoding="utf-8") for p in inputs]
    docs = documents(out, "train")
    assert len(docs) == len(texts)
    for text, ids in zip(texts, docs):
        assert ids.tolist() == tok.encode(text, add_special_tokens=False).ids + [m.eos_id]


def test_prepare_memory_stays_bounded_on_a_single_long_line(tmp_path):
    words = " ".join(stdlib_text(1_500_000).split())
    text = (words + " ") * (4_000_000 // len(words) + 1)
    big = tmp_path / "one-line.txt"
    big.write_text(text[:4_000_000], encoding="utf-8")
    size = big.stat().st_size
    measure = (
        "import resource, subprocess, sys\n"
        "proc = subprocess.run(sys.argv[1:], capture_output=True, text=True)\n"
        "print(proc.returncode, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)\n"
        "sys.stderr.write(proc.stdout + proc.stderr)\n"
    )
    cmd = [sys.executable, "-c", measure, sys.executable, "-m", "pretrain.cli", "prepare",
           "--out", str(tmp_path / "out"), "--input", str(big), "--vocab-size", "400",
           "--num-proc", "1"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "RAYON_NUM_THREADS": "2"}
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env, timeout=600)
    rc, peak_kib = map(int, proc.stdout.split())
    assert rc == 0, proc.stderr
    # Unsplit, this took about 200 bytes of memory per byte of the line (800 MB here); the
    # interpreter, NumPy and tokenizers alone are about 100 MB.
    assert peak_kib * 1024 < 100e6 + 40 * size, f"peak RSS {peak_kib} KiB for {size} bytes"
    assert load_manifest(tmp_path / "out").vocab_size == 400


def test_a_vocabulary_smaller_than_asked_is_reported(tmp_path):
    line = tmp_path / "few-words.txt"
    line.write_text(" ".join(["red", "green", "blue", "bird"] * 10_000), encoding="utf-8")
    logged = []
    m = prepare_dataset(tmp_path / "out", [str(line)], vocab_size=400, val_fraction=0.0,
                        log=logged.append)  # fmt: skip
    assert m.vocab_size < 400
    assert f"note: the corpus supports only {m.vocab_size} tokens (asked for 400)" in "\n".join(
        logged
    )


# --- rows that do not fit the schema -----------------------------------------------------------


def test_jsonl_rows_without_the_text_field_or_with_other_values_are_refused(tmp_path):
    good = [json.dumps({"text": f"document {i} " * 10}) for i in range(4)]
    path = tmp_path / "rows.jsonl"
    cases = {
        '{"content": "the text is under another name"}': "line 4 has no field 'text' (fields: content)",
        '{"text": ["a", "list"]}': "line 4: field 'text' holds list, not text",
        '["a", "row", "that", "is", "no", "object"]': "line 4 is a JSON list, not an object",
        '{"text": "unfinished': "line 4 is not valid JSON",
    }
    for row, expected in cases.items():
        path.write_text("\n".join(good[:3] + [row] + good[3:]) + "\n")
        message = bad_prepare(tmp_path, [str(path)])
        assert f"{path} {expected}" in message, message
    path.write_text("\n".join(good[:2] + ['{"text": null}', "", '{"text": ""}']) + "\n")
    logged = []
    m = prepare_dataset(tmp_path / "nulls", [str(path)], vocab_size=300, val_fraction=0.0,
                        log=logged.append)  # fmt: skip
    assert m.raw["stats"]["documents"]["train"] == 2 and "skipped 2 empty documents" in logged


def test_jsonl_needs_no_datasets_package_and_names_a_bad_row(tmp_path):
    rows = [json.dumps({"body": f"row {i}: " + "words and more words " * 5}) for i in range(30)]
    (tmp_path / "rows.jsonl").write_text("\n".join(rows) + "\n")
    blocked = [sys.executable, str(ROOT / "tests" / "test_minimal_deps.py"), "pretrain.cli"]
    cmd = [*blocked, "prepare", "--input", str(tmp_path / "rows.jsonl"), "--text-field", "body",
           "--vocab-size", "300", "--val-fraction", "0", "--num-proc", "1"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    ok = subprocess.run([*cmd, "--out", str(tmp_path / "ok")], capture_output=True, text=True,
                        cwd=ROOT, env=env, timeout=120)  # fmt: skip
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert load_manifest(tmp_path / "ok").num_docs("train") == 30
    rows[20] = json.dumps({"text": "the field is missing here"})
    (tmp_path / "rows.jsonl").write_text("\n".join(rows) + "\n")
    bad = subprocess.run([*cmd, "--out", str(tmp_path / "bad")], capture_output=True, text=True,
                         cwd=ROOT, env=env, timeout=120)  # fmt: skip
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0, bad.stderr[-3000:]
    assert f"{tmp_path / 'rows.jsonl'} line 21 has no field 'body'" in bad.stderr
