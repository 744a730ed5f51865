"""preprocess: JSON lines -> .bin/.idx, checked against megatron-core's own builder and reader
fed with the HF tokenizer's own ids (Megatron-LM's rules written out independently here)."""
from __future__ import annotations

import filecmp
import gzip
import json
import os

import numpy as np
import pytest
import zstandard
from helpers import train_tiny_tokenizer

from megatron_patch.data import preprocess
from megatron_patch.data.corpus import iter_stdlib_docstrings

EDGE_DOCS = ["", "   ", "café — naïve ☃ 𝔘nicode", ["First sentence.", "", "Second one."],
             ["", ""], "x"]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    return train_tiny_tokenizer(str(tmp_path_factory.mktemp("tok")))


@pytest.fixture(scope="module")
def docs():
    texts = [t for _, t in zip(range(60), iter_stdlib_docstrings())]
    return texts[:30] + EDGE_DOCS + texts[30:]


def write_jsonl(path, values, key="text", opener=open) -> str:
    with opener(path, "wt", encoding="utf-8") as out:
        for value in values:
            out.write(json.dumps({key: value, "meta": 1}, ensure_ascii=False) + "\n")
    return str(path)


def reference(prefix: str, values, tokenizer_dir: str, append_eod: bool = True) -> list:
    """Megatron-LM's encode + IndexedDatasetBuilder, with the HF tokenizer; returns the
    expected sequences."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tokenizer_dir)
    builder = IndexedDatasetBuilder(f"{prefix}.bin", dtype=DType.optimal_dtype(len(hf)))
    sequences = []
    for value in values:
        ids, lengths = [], []
        for sentence in (value if isinstance(value, list) else [value]):
            sentence_ids = hf(sentence).input_ids
            if sentence_ids:
                ids += sentence_ids
                lengths.append(len(sentence_ids))
        if ids and append_eod:
            ids.append(hf.eos_token_id)
            lengths[-1] += 1
        builder.add_document(ids, lengths)
        sequences += np.split(np.array(ids), np.cumsum(lengths)[:-1]) if ids else []
    builder.finalize(f"{prefix}.idx")
    return sequences


def run(inputs, prefix, tokenizer_dir, *extra) -> int:
    argv = ["--input", *inputs, "--output-prefix", str(prefix), "--tokenizer-type", "bloombpe",
            "--tokenizer-model", tokenizer_dir, "--log-interval", "10", *extra]
    return preprocess.main(argv)


def assert_same_dataset(ours: str, ref: str, sequences: list) -> None:
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    dataset = IndexedDataset(ours)
    assert len(dataset) == len(sequences)
    for index, expected in enumerate(sequences):
        assert dataset[index].tolist() == list(expected)
    reference_dataset = IndexedDataset(ref)
    assert dataset.document_indices.tolist() == reference_dataset.document_indices.tolist()
    for ext in ("bin", "idx"):
        assert filecmp.cmp(f"{ours}.{ext}", f"{ref}.{ext}", shallow=False), ext


@pytest.mark.parametrize("workers", [1, 2])
def test_matches_megatron_builder(tmp_path, tokenizer_dir, docs, workers, capsys):
    source = write_jsonl(tmp_path / "in.jsonl", docs)
    # small chunks: many tasks in flight, line numbers carried across chunks
    assert run([source], tmp_path / "out" / "c", tokenizer_dir, "--append-eod",
               "--workers", str(workers), "--chunk-bytes", "700") == 0
    sequences = reference(str(tmp_path / "ref"), docs, tokenizer_dir)
    assert_same_dataset(str(tmp_path / "out" / "c_text_document"), str(tmp_path / "ref"),
                        sequences)
    captured = capsys.readouterr()
    assert "docs/s" in captured.err and "MB/s" in captured.err and "ETA" in captured.err
    assert f"Done: {len(docs)} documents" in captured.out and "0 line(s) skipped" in captured.out
    assert sorted(os.listdir(tmp_path / "out")) == ["c_text_document.bin",
                                                    "c_text_document.idx"]


def test_without_eod_and_empty_documents(tmp_path, tokenizer_dir):
    source = write_jsonl(tmp_path / "in.json", EDGE_DOCS)  # .json: Megatron-LM's loose json
    assert run([source], tmp_path / "o", tokenizer_dir, "--workers", "1") == 0
    sequences = reference(str(tmp_path / "ref"), EDGE_DOCS, tokenizer_dir, append_eod=False)
    assert_same_dataset(str(tmp_path / "o_text_document"), str(tmp_path / "ref"), sequences)


def test_compressed_directory_and_glob_inputs(tmp_path, tokenizer_dir, docs):
    parts = tmp_path / "parts"
    (parts / "sub").mkdir(parents=True)
    write_jsonl(parts / "a.jsonl.gz", docs[:20], opener=gzip.open)
    with open(parts / "sub" / "b.jsonl.zst", "wb") as out:  # two frames, like `cat x.zst y.zst`
        for piece in (docs[20:40], docs[40:]):
            text = "".join(json.dumps({"text": v}) + "\n" for v in piece)
            out.write(zstandard.ZstdCompressor().compress(text.encode()))
    (parts / "notes.txt").write_text("not an input")
    sequences = reference(str(tmp_path / "ref"), docs, tokenizer_dir)
    for name, inputs in [("dir", [str(parts)]), ("glob", [str(parts / "**" / "*.jsonl.*")]),
                         ("files", [str(parts / "a.jsonl.gz"), str(parts / "sub" / "b.jsonl.zst")])]:
        assert run(inputs, tmp_path / name, tokenizer_dir, "--append-eod", "--workers", "2") == 0
        assert_same_dataset(str(tmp_path / f"{name}_text_document"), str(tmp_path / "ref"),
                            sequences)


def test_bad_lines_are_reported_and_skipped(tmp_path, tokenizer_dir, capsys):
    source = tmp_path / "bad.jsonl"
    with open(source, "wb") as out:
        out.write(b'{"text": "good one"}\n')
        out.write(b'{"text": "broken\n')                       # line 2
        out.write(b'{"title": "no text"}\n')                   # line 3
        out.write(b'{"text": "bad \xff\xfe bytes"}\n')         # line 4
        out.write(b'\n')                                       # line 5
        out.write(b'{"text": 42}\n')                           # line 6
        out.write(b'{"text": "big int", "n": 123456789012345678901234567890}\n')  # orjson: no
        out.write(b'{"text": "good two"}')                     # line 8, no newline
    assert run([str(source)], tmp_path / "o", tokenizer_dir, "--append-eod") == 0
    err, out = capsys.readouterr()[::-1]
    for line, reason in [(2, "invalid JSON"), (3, "missing key 'text'"), (4, "not valid UTF-8"),
                         (5, "empty line"), (6, "key 'text' is int")]:
        assert f"{source}:{line}: skipped: {reason}" in err
    assert "Done: 3 documents" in out and "5 line(s) skipped" in out
    assert f"skipped 1: invalid JSON (first at {source}:2)" in out
    sequences = reference(str(tmp_path / "ref"), ["good one", "big int", "good two"],
                          tokenizer_dir)
    assert_same_dataset(str(tmp_path / "o_text_document"), str(tmp_path / "ref"), sequences)


def test_multiple_keys_stay_aligned(tmp_path, tokenizer_dir):
    source = tmp_path / "two.jsonl"
    rows = [{"text": "alpha body", "title": "Alpha"}, {"text": "beta body"},
            {"text": "gamma body", "title": "Gamma"}]
    source.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert run([str(source)], tmp_path / "o", tokenizer_dir, "--json-keys", "text", "title",
               "--append-eod") == 0
    for key in ("text", "title"):
        expected = reference(str(tmp_path / f"ref_{key}"), [rows[0][key], rows[2][key]],
                             tokenizer_dir)
        assert_same_dataset(str(tmp_path / f"o_{key}_document"), str(tmp_path / f"ref_{key}"),
                            expected)


def _assert_failed(tmp_path, capsys, status: int, *fragments) -> None:
    assert status == 1
    err = capsys.readouterr().err
    for fragment in fragments:
        assert fragment in err, err
    leftovers = [name for name in os.listdir(tmp_path / "out")] if (tmp_path / "out").exists() \
        else []
    assert leftovers == [], leftovers  # no final .bin/.idx, no temporaries


def test_stop_on_bad_line(tmp_path, tokenizer_dir, capsys):
    source = write_jsonl(tmp_path / "in.jsonl", ["fine"] * 5)
    with open(source, "a") as out:
        out.write("{oops}\n")
    status = run([source], tmp_path / "out" / "p", tokenizer_dir, "--on-bad-line", "stop")
    _assert_failed(tmp_path, capsys, status, f"{source}:6: invalid JSON")


@pytest.mark.parametrize("suffix", [".jsonl.zst", ".jsonl.gz"])
def test_truncated_compressed_input(tmp_path, tokenizer_dir, docs, capsys, suffix):
    text = "".join(json.dumps({"text": d}) + "\n" for d in docs * 20).encode()
    packed = zstandard.ZstdCompressor().compress(text) if suffix.endswith("zst") \
        else gzip.compress(text)
    source = tmp_path / f"cut{suffix}"
    source.write_bytes(packed[: len(packed) * 2 // 3])
    status = run([str(source)], tmp_path / "out" / "p", tokenizer_dir, "--workers", "2")
    _assert_failed(tmp_path, capsys, status, f"{source}: corrupt or truncated input after line")


def test_unreadable_input_is_named(tmp_path, tokenizer_dir, capsys, monkeypatch):
    """Running as root, permissions cannot be taken away: opening the file fails instead."""
    from megatron_patch.data import readers

    source = tmp_path / "locked.jsonl"
    source.write_text(json.dumps({"text": "a b c"}) + "\n")

    def refuse(path, mode="r", *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(readers, "open", refuse, raising=False)
    status = run([str(source)], tmp_path / "out" / "p", tokenizer_dir, "--workers", "1")
    _assert_failed(tmp_path, capsys, status, f"{source}: cannot read (Permission denied)")


def test_empty_and_missing_inputs(tmp_path, tokenizer_dir, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    status = run([str(empty)], tmp_path / "out" / "p", tokenizer_dir)
    _assert_failed(tmp_path, capsys, status, "no documents to write")
    status = run([str(tmp_path / "nothing*.jsonl")], tmp_path / "out" / "p", tokenizer_dir)
    _assert_failed(tmp_path, capsys, status, "--input", "nothing*.jsonl")
    array = tmp_path / "array.json"
    array.write_text(json.dumps([{"text": "a"}]))
    status = run([str(array)], tmp_path / "out" / "p", tokenizer_dir)
    _assert_failed(tmp_path, capsys, status, f"{array}: this is a JSON array")


def test_unwritable_output(tmp_path, tokenizer_dir, capsys):
    source = write_jsonl(tmp_path / "in.jsonl", ["fine"])
    blocker = tmp_path / "file"
    blocker.write_text("a file where a directory should be")
    status = run([source], blocker / "sub" / "p", tokenizer_dir)
    _assert_failed(tmp_path, capsys, status, "--output-prefix: cannot write in")
    if os.geteuid() != 0:  # root ignores directory permissions
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        status = run([source], locked / "p", tokenizer_dir)
        _assert_failed(tmp_path, capsys, status, "--output-prefix: cannot write in")
        assert os.listdir(locked) == []


@pytest.mark.parametrize("flags, message", [
    (["--split-sentences"], "--split-sentences is not supported"),
    (["--vocab-file", "v.json", "--merge-file", "m.txt"], "--vocab-file/--merge-file are not"),
    (["--workers", "0"], "must be >= 1")])
def test_refused_flags(tmp_path, tokenizer_dir, capsys, flags, message):
    source = write_jsonl(tmp_path / "in.jsonl", ["fine"])
    _assert_failed(tmp_path, capsys, run([source], tmp_path / "out" / "p", tokenizer_dir, *flags),
                   message)


def test_int32_for_large_vocabulary(tmp_path):
    """Megatron-LM's dtype rule: 65500 ids or more are stored as int32."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "</s>": 1, **{f"w{i}": i for i in range(2, 70000)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    big = str(tmp_path / "big")
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>",
                            eos_token="</s>").save_pretrained(big)
    source = write_jsonl(tmp_path / "in.jsonl", ["w69999 w2 w65536", "w70000"])
    assert run([source], tmp_path / "o", big, "--append-eod") == 0
    dataset = IndexedDataset(str(tmp_path / "o_text_document"))
    assert dataset.index.dtype == np.int32
    assert [dataset[i].tolist() for i in range(2)] == [[69999, 2, 65536, 1], [0, 1]]


def test_output_feeds_gpt_dataset(tmp_path, tokenizer_dir, docs):
    """Our tokenizer as GPTDatasetConfig.tokenizer over our output: megatron-core builds
    samples whose tokens are the ones preprocessed."""
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder)
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig

    from megatron_patch.tokenizers import build_tokenizer

    source = write_jsonl(tmp_path / "in.jsonl", docs)
    assert run([source], tmp_path / "o", tokenizer_dir, "--append-eod") == 0
    prefix = str(tmp_path / "o_text_document")
    config = GPTDatasetConfig(
        random_seed=1, sequence_length=16, blend=([prefix], None), split="1,0,0",
        tokenizer=build_tokenizer("bloombpe", tokenizer_dir), reset_position_ids=False,
        reset_attention_mask=False, eod_mask_loss=False, path_to_cache=str(tmp_path / "cache"))
    train, _, _ = BlendedMegatronDatasetBuilder(GPTDataset, [8, None, None], lambda: True,
                                                config).build()
    stream = np.fromfile(f"{prefix}.bin", dtype=np.uint16)
    for index in range(8):
        sample = train[index]
        tokens = np.append(sample["tokens"].numpy(), sample["labels"].numpy()[-1])
        assert len(tokens) == 17 and set(tokens.tolist()) <= set(stream.tolist())


WRAPPER = "toolkits/pretrain_data_preprocessing/run_make_pretraining_dataset.sh"


def _bash(args: list, env: dict):
    import subprocess
    import sys

    from helpers import REPO

    full_env = dict(os.environ, PYTHON=sys.executable, **env)
    return subprocess.run(["bash", WRAPPER, *args], capture_output=True, text=True, cwd=REPO,
                          env=full_env, timeout=300)


def test_seed_wrapper_end_to_end(tmp_path, tokenizer_dir, docs):
    """The seed's pipeline: cleaned jsonl -> shard_jsonl (.zst shards) -> wrapper -> dataset."""
    from helpers import REPO

    from megatron_patch.data.shard import shard_jsonl

    source = write_jsonl(tmp_path / "cleaned.jsonl", docs)
    shard_jsonl([source], str(tmp_path / "shards"), lines_per_shard=16)
    proc = _bash(["none", REPO, str(tmp_path / "shards"), "bloombpe", str(tmp_path / "out")],
                 env={"TOKENIZER_PATH": tokenizer_dir, "WORKERS": "2"})
    assert proc.returncode == 0, proc.stderr
    assert "Warning" not in proc.stderr, proc.stderr  # megatron-core's import-time notices
    assert sorted(os.listdir(tmp_path / "out")) == ["wudao_bloombpe_text_document.bin",
                                                    "wudao_bloombpe_text_document.idx"]
    sequences = reference(str(tmp_path / "ref"), docs, tokenizer_dir)
    assert_same_dataset(str(tmp_path / "out" / "wudao_bloombpe_text_document"),
                        str(tmp_path / "ref"), sequences)


def test_seed_wrapper_refuses_an_unsupported_megatron_core(tmp_path, tokenizer_dir, docs):
    from helpers import REPO

    checkout = tmp_path / "Megatron-LM"
    (checkout / "megatron" / "core").mkdir(parents=True)
    (checkout / "megatron" / "__init__.py").write_text("")
    (checkout / "megatron" / "core" / "__init__.py").write_text("__version__ = '0.12.0'\n")
    source = write_jsonl(tmp_path / "in.jsonl", docs)
    proc = _bash([str(checkout), REPO, source, "bloombpe", str(tmp_path / "out")],
                 env={"TOKENIZER_PATH": tokenizer_dir})
    assert proc.returncode == 2
    assert proc.stderr.count("error: megatron-core 0.12.0 from") == 1, proc.stderr
    assert "Traceback" not in proc.stderr and not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("args, message", [
    (["a", "b", "c"], "expected 5 or 6 arguments, got 3"),
    (["none", ".", "in", "bloombpe", "out"], "no tokenizer files"),
    (["none", "/no/repo", "in", "bloombpe", "out", "tok"], "holds no megatron_patch package")])
def test_seed_wrapper_usage(args, message):
    proc = _bash(args, env={"TOKENIZER_PATH": ""})
    assert proc.returncode == 2
    assert proc.stderr.startswith("usage: run_make_pretraining_dataset.sh MEGATRON_PATH")
    assert message in proc.stderr


# --------------------------------------------------------------------------- benchmark


def load_bench_preprocess():
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                        "toolkits", "benchmarks", "bench_preprocess.py")
    spec = importlib.util.spec_from_file_location("bench_preprocess", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    return bench


def test_bench_mixed_corpus_and_output_check(tmp_path):
    """The benchmark's mixed corpus is reproducible Chinese, English and mixed documents, and
    its byte comparison names the file that differs (the benchmark then fails)."""
    bench = load_bench_preprocess()
    english = [t for _, t in zip(range(20), iter_stdlib_docstrings())]
    paths = [tmp_path / "a.jsonl", tmp_path / "b.jsonl"]
    for path in paths:
        assert bench.write_mixed_corpus(str(path), 60, english) == 60
    assert filecmp.cmp(*paths, shallow=False)
    texts = [json.loads(line)["text"] for line in open(paths[0], encoding="utf-8")]
    has_chinese = [any("\u4e00" <= c <= "\u9fff" for c in text) for text in texts]
    has_english = [any(word in text for word in (" the ", " a ", " of ")) for text in texts]
    assert sum(has_chinese) > 20 and sum(not c for c in has_chinese) > 10
    assert sum(c and e for c, e in zip(has_chinese, has_english)) > 5  # mixed documents
    for prefix, tail in (("ours", b"\x01"), ("same", b"\x01"), ("other", b"\x02")):
        (tmp_path / f"{prefix}.bin").write_bytes(b"\x00" + tail)
        (tmp_path / f"{prefix}.idx").write_bytes(b"idx")
    assert bench.different_outputs(str(tmp_path / "ours"), str(tmp_path / "same")) == []
    assert bench.different_outputs(str(tmp_path / "ours"), str(tmp_path / "other")) == [
        f"{tmp_path / 'other'}.bin"]
