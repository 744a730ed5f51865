"""Raw-text cleaning: each rule, bad input with file:line, counts, determinism across -p."""
from __future__ import annotations

import json
import os

import pytest

from helpers import run_python
from megatron_patch.data.cleaning import CleanConfig, CleanError, clean_corpus, clean_text
from megatron_patch.data.corpus import iter_stdlib_docstrings

CLI = "toolkits/pretrain_data_preprocessing/clean_raw_text.py"
LONG = "This sentence is long enough to pass the minimum length filter of the cleaner."


def cleaned(text: str, **config) -> str:
    text, reason = clean_text(text, CleanConfig(min_chars=0, **config))
    assert reason is None
    return text


def read_jsonl(path: str) -> list[str]:
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line)["text"] for line in handle]


def write_jsonl(path: str, records: list) -> str:
    with open(path, "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    return path


# ------------------------------------------------------------------------- one test per rule


def test_nfkc_normalisation():
    assert cleaned("ｆｕｌｌｗｉｄｔｈ ﬁne №１") == "fullwidth fine No1"


def test_whitespace_normalisation():
    assert cleaned("  a \t b\u3000\u00a0c \n\n   d  ") == "a b c d"


def test_control_and_invisible_characters_removed():
    assert cleaned("a\x00b\x07c\u200bd\ufeffe\u200d") == "abcde\u200d"


def test_too_short_documents_dropped():
    assert clean_text("tiny", CleanConfig(min_chars=10))[1] == "too_short"


def test_repeated_lines_dropped():
    text = "\n".join(["buy now"] * 3 + ["one honest line", "another honest line"])
    assert clean_text(text, CleanConfig(min_chars=0))[1] == "repeated_lines"


def test_repeated_characters_dropped():
    assert clean_text("wow " + "!" * 40, CleanConfig(min_chars=0))[1] == "repeated_chars"


def test_keep_newlines():
    text = "para one\n\n\n\n para two \nline"
    assert cleaned(text, keep_newlines=True) == "para one\n\npara two\nline"
    assert cleaned(text) == "para one para two line"


def test_exact_duplicates_dropped_across_files(tmp_path):
    write_jsonl(tmp_path / "in.jsonl", [{"text": LONG}, {"text": "other " + LONG}])
    os.makedirs(tmp_path / "dir")
    write_jsonl(tmp_path / "dir" / "a.jsonl", [{"text": LONG}])
    # The same text after cleaning (extra spaces) is a duplicate too.
    write_jsonl(tmp_path / "dir" / "b.jsonl", [{"text": "  " + LONG.replace(" ", "   ")}])
    summary = clean_corpus(str(tmp_path / "dir"), str(tmp_path / "out"))
    assert summary.dropped["duplicate"] == 1
    assert read_jsonl(tmp_path / "out" / "a.json") == [LONG]
    assert read_jsonl(tmp_path / "out" / "b.json") == []


def test_help_lists_every_rule_with_its_default():
    usage = run_python([CLI, "--help"]).stdout.replace("\n", " ")
    for flag in ("--min-chars", "--max-repeated-line-fraction", "--max-top-char-fraction",
                 "--keep-newlines", "--no-dedup"):
        assert flag in usage
    for words in ("(default: 32)", "(default: 0.3)", "NFKC", "whitespace", "invisible"):
        assert words in " ".join(usage.split())


# ------------------------------------------------------------------------------- input forms


def test_wudao_json_list_and_jsonl(tmp_path):
    body = "正文内容足够长，可以通过最短长度的过滤器。这里还有第二句话。"
    records = [{"title": "标题一", "content": body, "id": 1},
               {"title": "", "content": "Second " + LONG, "dataType": "x"}]
    os.makedirs(tmp_path / "in")
    with open(tmp_path / "in" / "wudao.json", "w", encoding="utf-8") as handle:
        json.dump(records, handle, ensure_ascii=False, indent=2)
    write_jsonl(tmp_path / "in" / "lines.jsonl", [{"title": "Title", "content": LONG}])
    clean_corpus(str(tmp_path / "in"), str(tmp_path / "out"))
    # NFKC maps the full-width comma to ","; the title is the document's first line.
    assert read_jsonl(tmp_path / "out" / "wudao.json") == [
        "标题一 " + body.replace("，", ","), "Second " + LONG]
    assert read_jsonl(tmp_path / "out" / "lines.json") == ["Title " + LONG]


def test_bad_input_reported_with_file_and_line(tmp_path):
    path = tmp_path / "in.jsonl"
    with open(path, "wb") as handle:
        handle.write(json.dumps({"text": LONG}).encode() + b"\n\n")
        handle.write(b'{"text": "not utf-8 \xff\xfe here, but long enough to be kept"}\n')
        handle.write(b'{"text": broken\n')
        handle.write(b'{"body": "no text key"}\n')
    broken_list = tmp_path / "list.json"
    broken_list.write_text('[\n {"text": "%s"},\n {"text": oops}\n]' % LONG)
    proc = run_python([CLI, "-i", str(path), "-o", str(tmp_path / "out")])
    summary = json.loads((tmp_path / "out.summary.json").read_text())
    for where in (f"{path}:3: invalid_utf8", f"{path}:4: invalid_json", f"{path}:5: missing_key"):
        assert any(line.startswith(where) for line in summary["bad_input"]), where
        assert where in proc.stderr
    listed = clean_corpus(str(broken_list), str(tmp_path / "out2"))
    assert listed.bad_input[0].startswith(f"{broken_list}:3: invalid_json")
    assert listed.documents_kept == 1


def test_summary_counts_add_up(tmp_path):
    records = [{"text": LONG}, {"text": LONG}, {"text": "x"}, {"nope": 1}, {"text": "?" * 50}]
    write_jsonl(tmp_path / "in.jsonl", records)
    summary = clean_corpus(str(tmp_path / "in.jsonl"), str(tmp_path / "out"))
    assert summary.documents_read == len(records)
    assert summary.documents_kept + sum(summary.dropped.values()) == summary.documents_read
    assert (summary.documents_kept, summary.dropped["duplicate"], summary.dropped["too_short"],
            summary.dropped["missing_key"], summary.dropped["repeated_chars"]) == (1, 1, 1, 1, 1)
    assert json.loads((tmp_path / "out.summary.json").read_text())["documents_read"] == 5


def make_corpus(root) -> None:
    """Stdlib docstrings over jsonl and WuDao-list files, with duplicates and noise."""
    docs = [t for _, t in zip(range(1500), iter_stdlib_docstrings(min_chars=20))]
    os.makedirs(root / "sub")
    for part in range(3):
        chunk = docs[part * 500:(part + 1) * 500] + docs[:40]  # duplicates across files
        write_jsonl(root / f"part{part}.jsonl", [{"text": t + "\x00\u3000"} for t in chunk])
    with open(root / "sub" / "wudao.json", "w", encoding="utf-8") as handle:
        json.dump([{"title": "T", "content": t} for t in docs[::7]], handle)


def test_output_is_the_same_for_any_number_of_processes(tmp_path):
    make_corpus(tmp_path / "in")
    run_python([CLI, "-i", str(tmp_path / "in"), "-o", str(tmp_path / "p1"), "-p", "1"])
    run_python([CLI, "-i", str(tmp_path / "in"), "-o", str(tmp_path / "p2"), "-p", "2",
                "--chunk-size", "7"])
    names = ["part0.json", "part1.json", "part2.json", os.path.join("sub", "wudao.json")]
    for name in names:
        assert (tmp_path / "p1" / name).read_bytes() == (tmp_path / "p2" / name).read_bytes()
    assert sorted(os.listdir(tmp_path / "p2")) == ["part0.json", "part1.json", "part2.json",
                                                   "sub"]  # no temporary files left
    summary = json.loads((tmp_path / "p2.summary.json").read_text())
    assert summary["dropped"]["duplicate"] >= 80 and summary["documents_kept"] > 1000


# ---------------------------------------------------------------------------- runs that stop


@pytest.mark.parametrize("case", ["missing", "empty_dir", "empty_file", "output_is_a_file"])
def test_unusable_input_or_output_stops_with_a_clear_error(tmp_path, case):
    source, output = tmp_path / "in", tmp_path / "out"
    os.makedirs(source)
    expected = {"missing": "does not exist", "empty_dir": "no .json/.jsonl files",
                "empty_file": "is empty", "output_is_a_file": "cannot write"}[case]
    if case == "missing":
        source = tmp_path / "nowhere"
    if case == "empty_file":
        (source / "a.jsonl").write_text("")
    if case == "output_is_a_file":
        write_jsonl(source / "a.jsonl", [{"text": LONG}])
        output.write_text("a file")
    with pytest.raises(CleanError, match=expected):
        clean_corpus(str(source), str(output))
    proc = run_python([CLI, "-i", str(source), "-o", str(output)], check=False)
    assert proc.returncode == 2 and expected in proc.stderr


def test_a_run_that_stops_partway_leaves_no_output(tmp_path, monkeypatch):
    """Files finished before the failure are removed too: what is left must never look like
    the cleaned corpus."""
    from megatron_patch.data import cleaning

    make_corpus(tmp_path / "in")
    real = cleaning.clean_chunk

    def fails_on_the_third_file(task):
        if task[0] == 2:
            raise OSError("disk full")
        return real(task)

    monkeypatch.setattr(cleaning, "clean_chunk", fails_on_the_third_file)
    with pytest.raises(OSError, match="disk full"):
        clean_corpus(str(tmp_path / "in"), str(tmp_path / "out"))
    left = [os.path.join(root, name) for root, _, names in os.walk(tmp_path / "out")
            for name in names]
    assert left == [] and not (tmp_path / "out.summary.json").exists()


def test_a_summary_path_that_is_a_directory_stops_before_any_work(tmp_path):
    make_corpus(tmp_path / "in")
    (tmp_path / "sums").mkdir()
    with pytest.raises(CleanError, match="--summary .*sums is a directory"):
        clean_corpus(str(tmp_path / "in"), str(tmp_path / "out"),
                     summary_path=str(tmp_path / "sums"))
    assert os.listdir(tmp_path / "out") == [] and os.listdir(tmp_path / "sums") == []
