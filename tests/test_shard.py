"""shard_jsonl: the seed's cat + split -l + zstd in one step, checked by decompressing the shards
with zstandard and comparing with the inputs' lines."""
from __future__ import annotations

import glob
import gzip
import json
import os

import pytest
import zstandard
from helpers import run_python

from megatron_patch.data.shard import main, shard_jsonl

SCRIPT = "toolkits/pretrain_data_preprocessing/shard_jsonl.py"


def lines_of(count: int, start: int = 0) -> list[bytes]:
    return [json.dumps({"text": f"document {i} — ünïcode"}, ensure_ascii=False).encode() + b"\n"
            for i in range(start, start + count)]


def read_shards(directory, suffix=".jsonl.zst") -> list[list[bytes]]:
    shards = []
    for path in sorted(glob.glob(os.path.join(directory, f"*{suffix}"))):
        data = open(path, "rb").read()
        if suffix.endswith(".zst"):
            data = zstandard.ZstdDecompressor().stream_reader(data).read()
        shards.append(data.splitlines(keepends=True))
    return shards


def test_shards_hold_the_input_lines_in_order(tmp_path):
    first, second = lines_of(25), lines_of(13, start=25)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl").write_bytes(b"".join(first)[:-1])  # last line lacks "\n"
    with gzip.open(tmp_path / "in" / "b.jsonl.gz", "wb") as out:
        out.write(b"".join(second))
    summary = shard_jsonl([str(tmp_path / "in")], str(tmp_path / "out"), lines_per_shard=10,
                          threads=2)
    shards = read_shards(tmp_path / "out")
    assert sorted(os.listdir(tmp_path / "out")) == [f"{i:05d}.jsonl.zst" for i in range(4)]
    assert [len(shard) for shard in shards] == [10, 10, 10, 8]
    assert [line for shard in shards for line in shard] == first + second
    assert (summary.files, summary.lines, summary.shards) == (2, 38, 4)
    assert summary.bytes_in == len(b"".join(first + second))
    assert summary.bytes_out == sum(os.path.getsize(p) for p in glob.glob(f"{tmp_path}/out/*"))


def test_uncompressed_glob_and_cli_summary(tmp_path, capsys):
    for index in range(3):
        (tmp_path / f"part{index}.jsonl").write_bytes(b"".join(lines_of(4, start=4 * index)))
    status = main(["--input", str(tmp_path / "part*.jsonl"), "--output-dir",
                   str(tmp_path / "out"), "--lines-per-shard", "5", "--compress", "none"])
    assert status == 0
    assert "Wrote 3 shard(s): 12 lines" in capsys.readouterr().out
    shards = read_shards(tmp_path / "out", suffix=".jsonl")
    assert [line for shard in shards for line in shard] == lines_of(12)


def test_earlier_shards_refused_or_replaced(tmp_path, capsys):
    source = tmp_path / "in.jsonl"
    source.write_bytes(b"".join(lines_of(30)))
    assert main(["--input", str(source), "--output-dir", str(tmp_path / "out"),
                 "--lines-per-shard", "10"]) == 0
    again = ["--input", str(source), "--output-dir", str(tmp_path / "out"),
             "--lines-per-shard", "20"]
    assert main(again) == 1
    assert "already holds 3 shard(s)" in capsys.readouterr().err
    assert main(again + ["--overwrite"]) == 0
    assert [len(shard) for shard in read_shards(tmp_path / "out")] == [20, 10]


def test_truncated_input_is_an_error(tmp_path, capsys):
    packed = zstandard.ZstdCompressor().compress(b"".join(lines_of(5000)))
    source = tmp_path / "cut.jsonl.zst"
    source.write_bytes(packed[: len(packed) // 2])
    assert main(["--input", str(source), "--output-dir", str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert f"{source}: corrupt or truncated input after line" in err
    assert not glob.glob(str(tmp_path / "out" / "*.tmp*"))


@pytest.mark.parametrize("argv, message", [
    (["--lines-per-shard", "0"], "--lines-per-shard must be >= 1"),
    (["--level", "99"], "--level must be within 1..22 (zstd), got 99"),
    (["--input", "/no/such/dir"], "--input '/no/such/dir'")])
def test_bad_arguments(tmp_path, capsys, argv, message):
    source = tmp_path / "in.jsonl"
    source.write_bytes(b"".join(lines_of(3)))
    assert main(["--input", str(source), "--output-dir", str(tmp_path / "out"), *argv]) == 1
    assert message in capsys.readouterr().err


def test_help_shows_the_whole_description():
    proc = run_python([SCRIPT, "--help"])
    assert "``cat *.json > merged; split -l 1000; zstd`` in one streaming step." in \
        " ".join(proc.stdout.split())


def test_toolkit_script_runs(tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_bytes(b"".join(lines_of(7)))
    proc = run_python([SCRIPT, "--input", str(source), "--output-dir", str(tmp_path / "out"),
                       "--lines-per-shard", "3", "--threads", "1"])
    assert "Wrote 3 shard(s): 7 lines" in proc.stdout
    assert [line for shard in read_shards(tmp_path / "out") for line in shard] == lines_of(7)
