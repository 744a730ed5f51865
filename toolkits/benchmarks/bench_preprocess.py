"""Benchmark ``python -m megatron_patch.data.preprocess`` against Megatron-LM's pipeline.

Builds a JSON-lines corpus (``--corpus docstrings``: the standard library's docstrings,
shuffled, numbered and repeated to ``--corpus-mb``; ``--corpus mixed``: ``--docs`` Chinese,
English and mixed Chinese/English documents), trains a byte-level BPE HuggingFace tokenizer on
its first 3000 documents, then for each worker count times

* ours: ``megatron_patch.data.preprocess.run`` in this process, and
* the baseline, a faithful re-implementation of Megatron-LM ``tools/preprocess_data.py`` run in
  this process too: ``Pool.imap(encode, open(file), 32)``; per document ``json.loads`` and one
  ``tokenize`` call in the workers; ``IndexedDatasetBuilder.add_document`` per document in the
  main process. Its tokenizer is the one Megatron-LM builds with the installed megatron-core
  (``megatron.core.tokenizers`` ``build_tokenizer``, Megatron-LM's default flags), once as is and
  once with ``--tokenizer-hf-include-special-tokens`` (then ``tokenize`` is
  ``tokenizer(text).input_ids``, the older Megatron-LM call, which is faster).
* with ``--megatron-lm PATH``: that checkout's real script instead, with the checkout first on
  ``PYTHONPATH`` (its wall time is taken from its own last "Processed ... docs/s" line, so it
  leaves out its start-up; ours counts everything from the tokenizer load to the rename).

Outputs are compared byte for byte with ours; any difference fails the run (exit status 1).
Wall time gives docs/s and MB/s. CPU time (all processes) per document is printed too, because it
stays meaningful on a shared, busy machine; it is net of each pipeline's start-up (the least CPU
a run on the corpus's first 100 documents took: the real script spends about 10 CPU seconds
importing torch and Megatron-LM before it reads a line).

    python toolkits/benchmarks/bench_preprocess.py --corpus-mb 32 --workers 1 2
    python toolkits/benchmarks/bench_preprocess.py --corpus mixed --docs 12000 --workers 1 2 \
        --repeat 5 --megatron-lm /path/to/Megatron-LM   # a core_v0.16.1 checkout
"""
from __future__ import annotations

import argparse
import contextlib
import filecmp
import io
import json
import multiprocessing
import os
import random
import re
import resource
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
# Imported up front (megatron-core takes seconds), so no timed run pays for a first import.

from megatron_patch.data import preprocess  # noqa: E402
from megatron_patch.data.corpus import iter_stdlib_docstrings  # noqa: E402
from megatron_patch.tokenizers import base as _tokenizer_base  # noqa: E402,F401  imports
from megatron_patch.tokenizers.train import train_bpe_tokenizer  # noqa: E402

_STARTUP_DOCS = 100


def write_corpus(path: str, megabytes: float, seed: int = 0) -> int:
    """A JSON-lines file of about ``megabytes`` MB of shuffled, numbered docstrings."""
    texts = list(iter_stdlib_docstrings())
    rng = random.Random(seed)
    written, number = 0, 0
    with open(path, "w", encoding="utf-8") as out:
        while written < megabytes * 2**20:
            rng.shuffle(texts)
            for text in texts:
                line = json.dumps({"text": f"[{number}] {text}"}, ensure_ascii=False) + "\n"
                out.write(line)
                written += len(line.encode("utf-8"))
                number += 1
    return number


# Common modern Chinese words (news, technology and everyday prose) from which the ``mixed``
# corpus writes its Chinese sentences: nothing to download, and the same on every machine.
_CHINESE_WORDS = (
    "我们 你们 他们 这个 那个 一个 没有 已经 可以 因为 所以 但是 如果 虽然 而且 或者 然后 "
    "现在 今天 明天 去年 时间 地方 问题 方法 工作 学习 研究 发展 经济 社会 国家 政府 人民 "
    "公司 市场 企业 技术 科学 数据 模型 训练 计算 网络 系统 平台 服务 用户 产品 信息 文化 "
    "历史 教育 学校 学生 老师 城市 农村 环境 健康 医院 生活 家庭 朋友 孩子 父母 世界 中国 "
    "北京 上海 杭州 深圳 重要 主要 不同 相同 新的 大量 部分 全部 能够 需要 希望 认为 表示 "
    "提出 进行 实现 提高 增加 减少 支持 使用 利用 完成 开始 结束 继续 参加 组织 管理 建设 "
    "设计 处理 分析 结果 影响 作用 关系 情况 条件 标准 水平 能力 质量 速度 规模 成本 价格 "
    "语言 文字 文章 句子 词语 中文 英文 翻译 阅读 写作 图书 音乐 电影 体育 旅游 天气 春天 "
    "夏天 秋天 冬天 山水 河流 大海 森林 动物 植物 人工智能 大模型 深度学习 自然语言 处理器 "
    "显卡 内存 硬盘 软件 程序 代码 开源 社区 版本 更新 安装 配置 运行 测试 部署 预训练 微调"
).split()
_CHINESE_PUNCTUATION = ("，", "，", "，", "、", "；")
_CHINESE_ENDINGS = ("。", "。", "。", "！", "？")


def _chinese_sentence(rng: random.Random, english: list) -> str:
    """One sentence of 6-20 Chinese words; with ``english`` words, some of them in between."""
    parts = []
    for index in range(rng.randint(6, 20)):
        if english and rng.random() < 0.15:
            parts.append(f" {rng.choice(english)} ")
        else:
            parts.append(rng.choice(_CHINESE_WORDS))
        if index and rng.random() < 0.12:
            parts.append(rng.choice(_CHINESE_PUNCTUATION))
    return "".join(parts).strip() + rng.choice(_CHINESE_ENDINGS)


def _mixed_document(rng: random.Random, texts: list) -> str:
    """A Chinese, an English or a mixed document, in about equal shares."""
    kind = rng.randrange(3)
    if kind == 1:
        return rng.choice(texts)
    english = rng.choice(texts).split()[:40] if kind == 2 else []
    paragraphs = []
    for _ in range(rng.randint(1, 4)):
        sentences = [_chinese_sentence(rng, english) for _ in range(rng.randint(2, 8))]
        if kind == 2 and rng.random() < 0.5:
            sentences.append(" " + rng.choice(texts).split("\n\n")[0] + " ")
        paragraphs.append("".join(sentences))
    return "\n".join(paragraphs)


def write_mixed_corpus(path: str, documents: int, texts: list, seed: int = 0) -> int:
    """A JSON-lines file of ``documents`` mixed Chinese/English documents: Chinese prose from
    ``_CHINESE_WORDS``, English ``texts`` (standard-library docstrings), and Chinese with English
    words and paragraphs in it (as in web corpora such as WuDao)."""
    rng = random.Random(seed)
    with open(path, "w", encoding="utf-8") as out:
        for number in range(documents):
            text = f"[{number}] {_mixed_document(rng, texts)}"
            out.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    return documents


def tokenizer_sample(corpus: str, documents: int = 3000) -> list:
    """The first ``documents`` texts of ``corpus``: what the benchmark's BPE is trained on."""
    with open(corpus, encoding="utf-8") as lines:
        return [json.loads(line)["text"] for _, line in zip(range(documents), lines)]


def megatron_lm_tokenizer(tokenizer_dir: str, include_special_tokens: bool):
    """The tokenizer Megatron-LM's script builds for ``--tokenizer-type HuggingFaceTokenizer``
    with the installed megatron-core (0.16.1) and Megatron-LM's default flags."""
    from megatron.core.tokenizers.text.utils.build_tokenizer import build_tokenizer as build

    return build(argparse.Namespace(
        tokenizer_type="HuggingFaceTokenizer", tokenizer_model=tokenizer_dir, vocab_file=None,
        merge_file=None, tokenizer_special_tokens=None, tokenizer_hf_use_fast=False,
        trust_remote_code=False, tokenizer_hf_include_special_tokens=include_special_tokens,
        tokenizer_metadata=None))


class BaselineEncoder:
    """Megatron-LM preprocess_data.py's ``Encoder.encode``, for one key, no sentence split."""

    def __init__(self, tokenizer_dir: str, include_special_tokens: bool):
        self.tokenizer_args = (tokenizer_dir, include_special_tokens)

    def initializer(self) -> None:
        """Per worker, like Megatron-LM: a tokenizer in a class attribute."""
        BaselineEncoder.tokenizer = megatron_lm_tokenizer(*self.tokenizer_args)

    def encode(self, json_line: str):
        """One document: ids (+ eod when not empty) and sentence lengths."""
        text = json.loads(json_line)["text"]
        doc_ids, sentence_lens = [], []
        for sentence in (text if isinstance(text, list) else [text]):
            sentence_ids = BaselineEncoder.tokenizer.tokenize(sentence)
            if len(sentence_ids) > 0:
                doc_ids.extend(sentence_ids)
                sentence_lens.append(len(sentence_ids))
        if len(doc_ids) > 0:
            doc_ids.append(BaselineEncoder.tokenizer.eod)
            sentence_lens[-1] += 1
        return doc_ids, sentence_lens, len(json_line)


def run_baseline(corpus: str, prefix: str, tokenizer_dir: str, workers: int,
                 include_special_tokens: bool) -> None:
    """Megatron-LM's pipeline, re-implemented."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    encoder = BaselineEncoder(tokenizer_dir, include_special_tokens)
    tokenizer = megatron_lm_tokenizer(tokenizer_dir, include_special_tokens)
    with open(corpus, "r", encoding="utf-8") as fin, \
            multiprocessing.Pool(workers, initializer=encoder.initializer) as pool:
        builder = IndexedDatasetBuilder(f"{prefix}.bin",
                                        dtype=DType.optimal_dtype(tokenizer.vocab_size))
        for doc, sentence_lens, _ in pool.imap(encoder.encode, fin, 32):
            builder.add_document(doc, sentence_lens)
        builder.finalize(f"{prefix}.idx")


def run_megatron_lm(corpus: str, prefix: str, tokenizer_dir: str, workers: int,
                    checkout: str) -> float:
    """The real tools/preprocess_data.py; returns its processing seconds (from its log)."""
    cmd = [sys.executable, os.path.join(checkout, "tools", "preprocess_data.py"),
           "--input", corpus, "--output-prefix", prefix, "--json-keys", "text",
           "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", tokenizer_dir,
           "--append-eod", "--workers", str(workers), "--log-interval", "1000"]
    env = dict(os.environ, PYTHONPATH=f"{checkout}:{os.environ.get('PYTHONPATH', '')}")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    rates = re.findall(r"Processed (\d+) documents \(([\d.]+) docs/s", proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    if not rates:  # fewer documents than --log-interval (the start-up run)
        return 0.0
    documents, rate = rates[-1]
    return int(documents) / float(rate)


def run_ours(corpus: str, prefix: str, tokenizer_dir: str, workers: int) -> None:
    """megatron_patch.data.preprocess.run, in this process."""
    args = preprocess.build_parser().parse_args([
        "--input", corpus, "--output-prefix", prefix, "--tokenizer-type", "HuggingFaceTokenizer",
        "--tokenizer-model", tokenizer_dir, "--append-eod", "--workers", str(workers),
        "--log-interval", str(10**9)])
    with contextlib.redirect_stdout(io.StringIO()):  # its start-up line would break the table
        preprocess.run(args)


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (the pool's workers, once joined)."""
    own, children = (resource.getrusage(who) for who in (resource.RUSAGE_SELF,
                                                          resource.RUSAGE_CHILDREN))
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def timed(run, *args) -> tuple[float, float]:
    """(wall seconds, CPU seconds of all processes) of ``run(*args)``; a run that returns a
    number reports its own wall seconds."""
    wall, cpu = time.time(), cpu_seconds()
    own = run(*args)
    return own or time.time() - wall, cpu_seconds() - cpu


def different_outputs(ours: str, baseline: str) -> list:
    """The files (.bin, .idx) of the two prefixes that are not byte for byte equal."""
    return [f"{baseline}.{ext}" for ext in ("bin", "idx")
            if not filecmp.cmp(f"{ours}.{ext}", f"{baseline}.{ext}", shallow=False)]


def head_corpus(corpus: str, path: str, documents: int) -> str:
    """The first ``documents`` lines of ``corpus``: a run on it measures a pipeline's start-up
    (imports, tokenizer, pool, finalize), which its CPU per document leaves out."""
    with open(corpus, "rb") as lines, open(path, "wb") as out:
        out.writelines(line for _, line in zip(range(documents), lines))
    return path


def pipelines(args, work: str, corpus: str, tokenizer_dir: str, workers: int) -> list:
    """(name, output prefix, run, run's arguments without the input) of ours and each baseline
    for ``workers``; ``run(corpus, *arguments)`` runs it."""
    ours = os.path.join(work, f"ours_{workers}")
    found = [("megatron_patch.data.preprocess", f"{ours}_text_document", run_ours,
              (ours, tokenizer_dir, workers))]
    if args.megatron_lm:
        prefix = os.path.join(work, f"megatron_lm_{workers}")
        return found + [("Megatron-LM tools/preprocess_data.py", f"{prefix}_text_document",
                         run_megatron_lm, (prefix, tokenizer_dir, workers, args.megatron_lm))]
    for special in (False, True):
        prefix = os.path.join(work, f"baseline_{workers}_{int(special)}")
        found.append(("Megatron-LM pipeline" + (" +include-special-tokens" if special else ""),
                      prefix, run_baseline, (prefix, tokenizer_dir, workers, special)))
    return found


def parse_args(argv: list | None = None) -> argparse.Namespace:
    """Command-line flags."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", choices=["docstrings", "mixed"], default="docstrings",
                        help="docstrings: English, --corpus-mb of them; mixed: --docs mixed "
                             "Chinese/English documents")
    parser.add_argument("--corpus-mb", type=float, default=32.0)
    parser.add_argument("--docs", type=int, default=12000, help="documents of --corpus mixed")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--vocab-size", type=int, default=8000)
    parser.add_argument("--megatron-lm", help="a Megatron-LM checkout: run its real script")
    parser.add_argument("--repeat", type=int, default=1,
                        help="runs per pipeline, interleaved; the fastest is kept")
    parser.add_argument("--work-dir", help="keep corpus and outputs here (default: a temp dir)")
    return parser.parse_args(argv)


def _row(workers: int, name: str, documents: int, megabytes: float, times, ours=None,
         same: str = "") -> str:
    # speedup = the baseline's seconds / ours, in wall time and in CPU time of all processes
    wall, cpu = times
    speedup = f"{wall / ours[0]:.2f}x" if ours else ""
    cpu_speedup = f"{cpu / ours[1]:.2f}x" if ours else ""
    return (f"{workers:>7}  {name:<42} {documents / wall:>8.0f} {megabytes / wall:>6.2f} "
            f"{speedup:>8} {1e6 * cpu / (documents - _STARTUP_DOCS):>10.0f} {cpu_speedup:>8} "
            f"{same:>5}")


def measure(runs: list, corpus: str, small: str, repeat: int) -> list:
    """Per pipeline: (best wall seconds, best CPU seconds net of the start-up), runs
    interleaved so that a busy spell on a shared machine hits every pipeline alike. The
    start-up CPU is the least a run on ``small`` took, after one untimed run of each pipeline
    that runs in this process (the first such run pays for lazy imports)."""
    for _, _, run, run_args in runs:
        if run is not run_megatron_lm:
            run(small, *run_args)
    best = [[float("inf")] * 3 for _ in runs]
    for _ in range(repeat):
        for times, (_, _, run, run_args) in zip(best, runs):
            startup = timed(run, small, *run_args)[1]
            wall, cpu = timed(run, corpus, *run_args)
            times[:] = min(times[0], wall), min(times[1], cpu), min(times[2], startup)
    return [(wall, cpu - startup) for wall, cpu, startup in best]


def main(argv: list | None = None) -> None:
    """Build corpus and tokenizer, time each pipeline per worker count, print the table; exit
    with an error if any baseline's output differs from ours."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one worker = one core, for both sides
    args = parse_args(argv)
    work = args.work_dir or tempfile.mkdtemp(prefix="bench_preprocess_")
    os.makedirs(work, exist_ok=True)
    corpus = os.path.join(work, "corpus.jsonl")
    if args.corpus == "mixed":
        documents = write_mixed_corpus(corpus, args.docs, list(iter_stdlib_docstrings()))
    else:
        documents = write_corpus(corpus, args.corpus_mb)
    megabytes = os.path.getsize(corpus) / 2**20
    small = head_corpus(corpus, os.path.join(work, "startup.jsonl"), _STARTUP_DOCS)
    tokenizer_dir = train_bpe_tokenizer(tokenizer_sample(corpus), args.vocab_size,
                                        os.path.join(work, "tokenizer"))
    print(f"corpus: {args.corpus}, {documents} documents, {megabytes:.1f} MB; "
          f"HuggingFaceTokenizer (byte-level BPE, vocab {args.vocab_size}); "
          f"{os.cpu_count()} CPU(s); best of {args.repeat}; speedup = baseline time / ours; "
          f"CPU of all processes, net of a {_STARTUP_DOCS}-document run's (start-up)")
    print(f"{'workers':>7}  {'pipeline':<42} {'docs/s':>8} {'MB/s':>6} {'speedup':>8} "
          f"{'CPU us/doc':>10} {'CPU x':>8} {'same':>5}")
    differ = []
    for workers in args.workers:
        runs = pipelines(args, work, corpus, tokenizer_dir, workers)
        best = measure(runs, corpus, small, args.repeat)
        print(_row(workers, runs[0][0], documents, megabytes, best[0]), flush=True)
        for (name, prefix, _, _), times in zip(runs[1:], best[1:]):
            bad = different_outputs(runs[0][1], prefix)
            differ += bad
            print(_row(workers, name, documents, megabytes, times, best[0], str(not bad)),
                  flush=True)
    if differ:
        sys.exit(f"error: not byte-identical to ours ({runs[0][1]}.bin/.idx): "
                 + ", ".join(differ))


if __name__ == "__main__":
    main()
