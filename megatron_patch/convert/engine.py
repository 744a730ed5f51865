"""The conversion engine: runs a family's weight-mapping table in either direction and is the
only code that shards. HF tensors are the canonical form: Megatron -> Megatron resharding goes
through the ops' inverses too, so every direction uses the same table.

Memory stays near one rank file (HF -> Megatron) or one HF shard (Megatron -> HF) plus one full
tensor: readers copy each tensor out of its file with a plain read (nothing stays mapped), the
TP ranks of a stage are saved one at a time (see :func:`write_megatron_stages`) and the HF
writer streams each tensor to its shard's file as it comes (hf_io.HFWriter). ``python -m megatron_patch.convert`` also keeps freed
tensors from staying resident (:func:`~megatron_patch.convert.io_utils.
unmap_large_allocations_on_free`); ``toolkits/benchmarks/bench_convert.py`` measures the peaks.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys

from megatron_patch.convert import megatron_io as mio
from megatron_patch.convert import naming
from megatron_patch.convert.checkpoint_args import Vocabulary, count_tokenizer, metadata_from_args
from megatron_patch.convert.derived import mismatch
from megatron_patch.convert.hf_io import HFReader, HFWriter, copy_side_files, read_hf_config
from megatron_patch.convert.sat_io import SATReader, is_sat_checkpoint, write_sat
from megatron_patch.convert.io_utils import CheckpointError, TensorSpill, atomic_directory
from megatron_patch.convert.mapping import LAYER, Binding, bind_stage
from megatron_patch.convert.ops import Dims
from megatron_patch.convert.sharding import split_tensor, stage_layers
from megatron_patch.convert.vocab_rows import hf_vocab_rows, tokenizer_tokens
from megatron_patch.families.base import Family, ModelArgs
from megatron_patch.registry import family_for_model_type, get_family
from megatron_patch.tokenizers.vocab import padded_vocab_size

TOKENIZER_DIR = "tokenizer"


@dataclasses.dataclass(frozen=True)
class Target:
    """What to write on the Megatron side. A field left ``None`` keeps the source's value when
    a Megatron checkpoint is resharded, and takes :data:`HF_DEFAULTS` when converting from HF."""

    tensor_parallel: int | None = None
    pipeline_parallel: int | None = None
    extra_vocab_size: int | None = None
    make_vocab_size_divisible_by: int | None = None
    ckpt_format: str = "torch"
    transformer_impl: str | None = None   # the naming scheme written (:mod:`.naming`)

    def filled(self, defaults: dict) -> "Target":
        """This target with its ``None`` fields taken from ``defaults``."""
        return dataclasses.replace(self, **{key: value for key, value in defaults.items()
                                            if getattr(self, key) is None})


# Megatron-LM's defaults (--make-vocab-size-divisible-by 128, --transformer-impl local for our
# layer specs) and the seed's (no extra rows).
HF_DEFAULTS = dict(tensor_parallel=1, pipeline_parallel=1, extra_vocab_size=0,
                   make_vocab_size_divisible_by=128, transformer_impl=naming.LOCAL)


def source_layout(meta: dict) -> dict:
    """The :class:`Target` fields a Megatron checkpoint was written with."""
    return dict(tensor_parallel=meta["tensor_model_parallel_size"],
                pipeline_parallel=meta["pipeline_model_parallel_size"],
                extra_vocab_size=meta.get("extra_vocab_size", 0),
                make_vocab_size_divisible_by=meta.get("make_vocab_size_divisible_by", 128),
                transformer_impl=meta.get("transformer_impl", naming.LOCAL))


@dataclasses.dataclass
class Report:
    """What a conversion did, for the CLI's one-line summary: tensors read from the source
    (each full tensor once), full tensors written, and notes on anything not carried over."""

    tensors_read: int = 0
    tensors_written: int = 0
    source_layout: str = ""   # a Megatron source's, as :func:`layout_of` writes it
    notes: list[str] = dataclasses.field(default_factory=list)

    def counting(self, fetch):
        """``fetch`` that counts each full tensor it hands to a writer."""
        def counted(binding):
            self.tensors_written += 1
            return fetch(binding)
        return counted


def layout_of(meta: dict) -> str:
    """``TP=2, PP=1, torch``: how a Megatron checkpoint is laid out (``, transformer_engine``
    for a torch checkpoint in that spec's names)."""
    names = meta.get("ckpt_format", "torch") == "torch" and \
        meta.get("transformer_impl", naming.LOCAL) != naming.LOCAL
    return (f"TP={meta['tensor_model_parallel_size']}, PP={meta['pipeline_model_parallel_size']}, "
            f"{meta.get('ckpt_format', 'torch')}" + (f", {meta['transformer_impl']}" if names
                                                     else ""))


def dims_for(args: ModelArgs, padded: int) -> Dims:
    return Dims(args.num_attention_heads, args.num_query_groups, args.kv_channels,
                args.vocab_size, padded)


def _progress(total: int, desc: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="tensor", file=sys.stderr, disable=not enabled,
                dynamic_ncols=True)


def stage_bindings(family: Family, args: ModelArgs, pp: int, stage: int) -> list[Binding]:
    """Every tensor of one pipeline stage. With tied embeddings and PP > 1 the last stage
    holds its own copy of the embedding as ``output_layer.weight`` (megatron-core's rule)."""
    rows = family.rows(args)
    bindings = bind_stage(rows, stage_layers(args.num_layers, pp, stage), stage == 0,
                          stage == pp - 1)
    if args.tie_embeddings and pp > 1 and stage == pp - 1:
        embedding = bind_stage([r for r in rows if r.stage == "first"], range(0), True, False)
        bindings += [dataclasses.replace(b, megatron_local="output_layer.weight")
                     for b in embedding if b.megatron_local == "embedding.word_embeddings.weight"]
    return bindings


def build_metadata(family: Family, args: ModelArgs, target: Target, hf_config: dict | None,
                   tokenizer: bool) -> dict:
    """What a Megatron checkpoint needs to be read back (and converted back) on its own."""
    target = target.filled(HF_DEFAULTS)
    padded = padded_vocab_size(args.vocab_size, target.make_vocab_size_divisible_by,
                               target.tensor_parallel, target.extra_vocab_size)
    return {
        "format": "megatron_patch/1",
        "family": family.name,
        "model_args": args.to_dict(),
        "padded_vocab_size": padded,
        "make_vocab_size_divisible_by": target.make_vocab_size_divisible_by,
        "extra_vocab_size": target.extra_vocab_size,
        "tensor_model_parallel_size": target.tensor_parallel,
        "pipeline_model_parallel_size": target.pipeline_parallel,
        "ckpt_format": target.ckpt_format,
        "transformer_impl": target.transformer_impl,
        "hf_config": hf_config,
        "tokenizer": {"type": family.tokenizer, "path": TOKENIZER_DIR} if tokenizer else None,
    }


def write_megatron_stages(family, args, meta, fetch, save_rank, spill_dir: str,
                          progress: bool = True) -> None:
    """Build every rank's state dict from ``fetch(binding) -> full tensor`` and hand it to
    ``save_rank(stage, tp_rank, state_dict)``.

    Each full tensor is fetched once. TP rank 0's piece stays in memory and the other ranks'
    pieces are parked in files under ``spill_dir``; then rank 0 is saved and freed, and each
    other rank in turn is read back, saved and freed. Memory holds one rank of one stage plus
    one full tensor, not every rank of the stage."""
    tp, pp = meta["tensor_model_parallel_size"], meta["pipeline_model_parallel_size"]
    per_stage = [stage_bindings(family, args, pp, s) for s in range(pp)]
    dims = dims_for(args, meta["padded_vocab_size"])  # the grouped QKV's split needs them
    with _progress(sum(map(len, per_stage)), "writing megatron", progress) as bar:
        for stage, bindings in enumerate(per_stage):
            first = {}
            spills = [TensorSpill(os.path.join(spill_dir, f"spill-tp{rank}"))
                      for rank in range(1, tp)]
            for binding in bindings:
                pieces = split_tensor(fetch(binding), binding.row.tp, tp, dims)
                first[binding.megatron_local] = pieces[0]
                for spill, piece in zip(spills, pieces[1:]):
                    spill.put(binding.megatron_local, piece)
                bar.update(1)
            save_rank(stage, 0, first)
            del first  # before the next rank is read back
            for rank, spill in enumerate(spills, start=1):
                save_rank(stage, rank, spill.take())


def torch_rank_saver(iter_dir: str, meta: dict):
    """``save_rank`` for the ``torch`` format: one model_optim_rng.pt per rank (a converted
    checkpoint is iteration 0, "release"), in ``meta['transformer_impl']``'s names."""
    scheme = meta.get("transformer_impl", naming.LOCAL)

    def save(stage, rank, state):
        state = {naming.to_scheme(name, scheme): tensor for name, tensor in state.items()}
        state.update(dict.fromkeys(naming.extra_state_keys(state, scheme)))
        mio.save_rank_file(iter_dir, rank, stage, meta["pipeline_model_parallel_size"], {
            "model": state, "checkpoint_version": mio.CHECKPOINT_VERSION, "iteration": 0,
            "args": mio.megatron_lm_args(meta), "megatron_patch": meta})
    return save


def _write_checkpoint(family, args, meta, fetch, root, progress) -> None:
    """Write weights in ``meta['ckpt_format']`` plus metadata and tracker under ``root``."""
    iter_dir = os.path.join(root, mio.iteration_dir_name("release"))
    if meta["ckpt_format"] == "torch":
        os.makedirs(iter_dir, exist_ok=True)
        write_megatron_stages(family, args, meta, fetch, torch_rank_saver(iter_dir, meta),
                              iter_dir, progress)
    elif meta["ckpt_format"] == "torch_dist":
        from megatron_patch.convert.dist_io import save_torch_dist

        save_torch_dist(family, args, meta, fetch, iter_dir, progress)
    else:
        raise CheckpointError(f"--ckpt-format must be torch or torch_dist, got "
                              f"'{meta['ckpt_format']}'")
    mio.write_metadata(root, meta)
    mio.write_tracker(root, "release")


def _check_all_consumed(unconsumed: list[str], where: str) -> None:
    if unconsumed:
        shown = ", ".join(unconsumed[:10]) + (" ..." if len(unconsumed) > 10 else "")
        raise CheckpointError(f"{where}: {len(unconsumed)} tensor(s) not covered by the weight "
                              f"mapping: {shown}")


def resolve_hf_family(hf_config: dict, path: str, family_name: str | None) -> Family:
    """The family named on the command line must match config.json's model_type."""
    model_type = hf_config.get("model_type")
    if not model_type:
        raise CheckpointError(f"{path}/config.json has no model_type")
    if family_name is None:
        return family_for_model_type(model_type)
    family = get_family(family_name)
    if model_type not in family.hf_model_types:
        raise CheckpointError(f"--model-family {family_name} does not match {path}/config.json "
                              f"(model_type '{model_type}')")
    return family


def convert_hf_to_megatron(load: str, save: str, family_name: str | None = None,
                           target: Target = Target(), progress: bool = True,
                           overwrite: bool = False, report: Report | None = None) -> dict:
    """HF checkpoint directory -> Megatron checkpoint at ``target``'s layout (unset fields:
    :data:`HF_DEFAULTS`). Returns metadata; ``report`` gets what was done."""
    target, report = target.filled(HF_DEFAULTS), report or Report()
    hf_config = read_hf_config(load)  # the family and layout are checked before the weights
    family = resolve_hf_family(hf_config, load, family_name)
    args = family.args_from_hf(hf_config, os.path.join(load, "config.json"))
    args.validate_parallel(target.tensor_parallel, target.pipeline_parallel, "--target-")
    hf = SATReader(load) if is_sat_checkpoint(load) else HFReader(load)
    _check_derived_buffers(hf, family, args, report)
    with atomic_directory(save, overwrite) as root:
        has_tokenizer = copy_side_files(load, os.path.join(root, TOKENIZER_DIR))
        meta = build_metadata(family, args, target, hf.config, has_tokenizer)
        meta["dtype"] = str(hf.dtype()).replace("torch.", "")
        dims = dims_for(args, meta["padded_vocab_size"])
        fetch = lambda b: b.row.op.to_megatron([hf.get(n) for n in b.hf], dims)  # noqa: E731
        _write_checkpoint(family, args, meta, report.counting(fetch), root, progress)
        _consume_tied_head(hf, args)
        _check_all_consumed(hf.unconsumed(), load)
    report.tensors_read = len(hf.reads)
    return meta


def _check_derived_buffers(hf: HFReader, family: Family, args: ModelArgs,
                           report: Report) -> None:
    """Each derived buffer (``family.derived_buffers``) the checkpoint stores must be what its
    config gives; it is then consumed, and never written (see :mod:`.derived`)."""
    for buffer in family.derived_buffers:
        found = [name for name in buffer.names(args.num_layers) if hf.has(name)]
        for name in found:
            problem = mismatch(hf.get(name), buffer.kind.expected(args))
            if problem:
                raise CheckpointError(f"{hf.path}: {name} {problem}: it contradicts "
                                      f"config.json's {buffer.kind.config_fields(args)}")
        if found:
            report.notes.append(
                f"skipped {len(found)} {buffer.hf.replace(LAYER, '*')} buffer(s) after "
                f"checking them against {buffer.kind.config_fields(args)} (derived from the "
                f"config: not stored on the Megatron side, not written back to HF)")


def _consume_tied_head(hf: HFReader, args: ModelArgs) -> None:
    """A tied checkpoint may still store lm_head.weight; it must equal the embedding."""
    import torch

    if args.tie_embeddings and hf.has("lm_head.weight"):
        if not torch.equal(hf.get("lm_head.weight"), hf.get("model.embed_tokens.weight")):
            raise CheckpointError(f"{hf.path}: tie_word_embeddings is set but lm_head.weight "
                                  f"differs from model.embed_tokens.weight")


def open_megatron(load: str, family_name: str | None = None,
                  vocabulary: Vocabulary = Vocabulary(), report: Report | None = None):
    """(reader, family, args, meta) of a Megatron checkpoint in either format: its metadata is
    the iteration's own (``megatron_patch`` in its rank files or common state), or, for one
    that Megatron-LM wrote, built from the ``args`` it stores (:mod:`.checkpoint_args`) with
    ``family_name`` and ``vocabulary``; a megatron_patch.json beside it fills in what they do
    not say. ``report`` gets a note when the metadata came from Megatron-LM's args."""
    root, iter_dir = mio.resolve_checkpoint(load)
    if mio.is_torch_dist(iter_dir):
        from megatron_patch.convert.dist_io import COMMON_FILE, TorchDistReader, read_common_state

        where = os.path.join(iter_dir, COMMON_FILE)
        meta = _iteration_metadata(root, read_common_state(iter_dir), where, family_name,
                                   vocabulary, "torch_dist", report)
        reader = TorchDistReader(iter_dir, meta)
    else:
        reader = mio.MegatronReader(iter_dir)
        meta = _iteration_metadata(root, reader.first, reader.first_path, family_name,
                                   vocabulary, "torch", report)
        meta = {**meta, "transformer_impl": reader.naming}
        _check_rank_layout(reader, meta)
    family = get_family(meta["family"])
    if family_name and family_name != family.name:
        raise CheckpointError(f"--model-family {family_name} does not match {load} "
                              f"(family '{family.name}')")
    return reader, family, ModelArgs.from_dict(meta["model_args"]), meta


def _iteration_metadata(root: str, payload: dict, where: str, family_name: str | None,
                        vocabulary: Vocabulary, ckpt_format: str, report) -> dict:
    """The metadata of one iteration, from its payload (a rank file, a common state)."""
    root_meta = mio.read_metadata(root)
    meta = payload.get("megatron_patch")
    if meta is None and payload.get("args") is None:
        meta = root_meta  # written by an earlier megatron_patch, without args
    if meta is not None:
        _check_vocabulary_flags(meta, vocabulary, where)
        return meta
    if payload.get("args") is None:
        raise CheckpointError(f"{where}: no megatron_patch metadata and no Megatron-LM 'args': "
                              f"not a checkpoint megatron_patch or Megatron-LM wrote")
    family = _family_for_args(family_name, root_meta, where)
    meta, note = metadata_from_args(payload["args"], family, vocabulary, root_meta, ckpt_format,
                                    where)
    if report is not None:
        report.notes.append(note)
    return meta


def _family_for_args(family_name: str | None, root_meta: dict | None, where: str) -> Family:
    stored = (root_meta or {}).get("family")
    if family_name and stored and family_name != stored:
        raise CheckpointError(f"--model-family {family_name} does not match the "
                              f"{mio.METADATA} beside {where} (family '{stored}')")
    if not (family_name or stored):
        raise CheckpointError(f"{where}: no megatron_patch metadata (a checkpoint Megatron-LM "
                              f"wrote): give --model-family, the family it trained; its args "
                              f"give the shape")
    return get_family(family_name or stored)


def _check_vocabulary_flags(meta: dict, vocabulary: Vocabulary, where: str) -> None:
    """--vocab-size / --tokenizer-path given for a checkpoint with metadata must agree."""
    vocab = meta["model_args"]["vocab_size"]
    if vocabulary.size is not None and vocabulary.size != vocab:
        raise CheckpointError(f"--vocab-size {vocabulary.size} contradicts {where}'s metadata "
                              f"(vocab_size {vocab})")
    if vocabulary.tokenizer_path:
        tokens = count_tokenizer(vocabulary.tokenizer_path)
        if tokens > meta["padded_vocab_size"]:
            raise CheckpointError(f"--tokenizer-path {vocabulary.tokenizer_path} has {tokens} "
                                  f"tokens, more than the {meta['padded_vocab_size']} embedding "
                                  f"rows of {where}")


def _check_rank_layout(reader, meta: dict) -> None:
    """The rank directories are the layout; metadata that says otherwise is stale or wrong."""
    said = (meta["tensor_model_parallel_size"], meta["pipeline_model_parallel_size"])
    if said != (reader.tp, reader.pp):
        who = "its metadata says" if "megatron_patch" in reader.first else \
            "Megatron-LM's args say"
        raise CheckpointError(f"{reader.iter_dir}: {who} TP={said[0]} PP={said[1]} but it holds "
                              f"mp_rank directories for TP={reader.tp} PP={reader.pp}")


def megatron_full_fetcher(reader, args, meta, padded_vocab: int):
    """``fetch(binding) -> full Megatron tensor`` padded to ``padded_vocab`` rows. Vocabulary
    rows are carried as stored up to the smaller of the two paddings, so trained extra rows
    (and trained padding rows of the output layer) survive resharding and resuming at another
    TP; only rows past ``padded_vocab`` are cut, and new rows are zero."""
    carried = dataclasses.replace(args, vocab_size=min(meta["padded_vocab_size"], padded_vocab))
    src_dims = dims_for(carried, meta["padded_vocab_size"])
    dst_dims = dims_for(carried, padded_vocab)
    per_stage = args.num_layers // reader.pp

    def fetch(binding):
        full = reader.get(binding.megatron_global, binding.row.stage, binding.row.tp, per_stage,
                          src_dims)
        if src_dims == dst_dims:
            return full
        return binding.row.op.to_megatron(binding.row.op.to_hf(full, src_dims), dst_dims)
    return fetch


def _consume_tied_output(reader, args) -> None:
    """With tied embeddings and PP > 1 the last stage's output_layer copy is not needed."""
    if args.tie_embeddings and reader.pp > 1:
        reader.consumed.add((reader.pp - 1, "output_layer.weight"))


def convert_megatron_to_hf(load: str, save: str, family_name: str | None = None,
                           progress: bool = True, overwrite: bool = False,
                           report: Report | None = None,
                           vocabulary: Vocabulary = Vocabulary(),
                           sat_model_parallel: int | None = None) -> dict:
    """Megatron checkpoint (any TP/PP, ours or Megatron-LM's: see :func:`open_megatron`) -> HF
    directory that transformers loads. The HF vocabulary keeps the extra rows that the
    checkpoint's tokenizer has tokens for (:mod:`.vocab_rows`). ``sat_model_parallel``: write
    SwissArmyTransformer's checkpoint at that many model-parallel ranks instead
    (:mod:`.sat_io`; GLM-130B's release format)."""
    report = report or Report()
    reader, family, args, meta = open_megatron(load, family_name, vocabulary, report)
    report.source_layout = layout_of(meta)
    hf_args = _hf_vocabulary(reader.root, family, args, meta, report)
    dims = dims_for(hf_args, meta["padded_vocab_size"])
    fetch = megatron_full_fetcher(reader, args, meta, meta["padded_vocab_size"])
    # Every row once, with global names: the HF side has no pipeline stages.
    bindings = bind_stage(family.rows(hf_args), range(args.num_layers), True, True)
    if sat_model_parallel:
        _write_sat(save, overwrite, sat_model_parallel, bindings, fetch, dims, progress,
                   report, reader, args, family, hf_args, meta, load)
        return meta
    with atomic_directory(save, overwrite) as out, \
            _progress(len(bindings), "writing hf", progress) as bar:
        writer = HFWriter(out)
        for binding in bindings:
            for name, tensor in zip(binding.hf, binding.row.op.to_hf(fetch(binding), dims)):
                writer.add(name, tensor)
                report.tensors_written += 1
            bar.update(1)
        report.tensors_read = len(reader.consumed)
        _consume_tied_output(reader, args)
        _check_all_consumed(reader.unconsumed(), load)
        config = hf_config_for(family, hf_args, meta)
        if hf_args.reward_head and config.get("pad_token_id") is None:
            _set_reward_pad(config, reader.root, meta, report)
        writer.finish(config, tokenizer_dir(reader.root, meta))
    return meta


def _set_reward_pad(config: dict, root: str, meta: dict, report: Report) -> None:
    """transformers' sequence classifiers find each row's last token by ``pad_token_id`` (and
    refuse batches of more than one row without it): a reward model trained from a language
    model gets its tokenizer's pad id (its eos when it has no pad)."""
    from megatron_patch.convert.vocab_rows import tokenizer_pad_id

    pad = tokenizer_pad_id(root, meta)
    if pad is None:
        report.notes.append("config.json has no pad_token_id (no tokenizer to take it from): "
                            "transformers scores one row at a time until it is set")
        return
    config["pad_token_id"] = pad
    report.notes.append(f"set pad_token_id {pad} (the tokenizer's) in config.json, by which "
                        f"transformers finds each sequence's last token")


def _write_sat(save, overwrite, parts, bindings, fetch, dims, progress, report, reader, args,
               family, hf_args, meta, load) -> None:
    """The SAT side of :func:`convert_megatron_to_hf`: one pass over the source per rank."""
    if hf_args.num_attention_heads % parts or hf_args.ffn_hidden_size % parts:
        raise ValueError(f"--sat-model-parallel-size {parts} does not divide the "
                         f"{hf_args.num_attention_heads} heads and ffn size "
                         f"{hf_args.ffn_hidden_size}")

    def tensors():
        for binding in bindings:
            yield from zip(binding.hf, binding.row.op.to_hf(fetch(binding), dims))

    with atomic_directory(save, overwrite) as out, \
            _progress(parts, "writing sat ranks", progress) as bar:
        def counted():
            for item in tensors():
                report.tensors_written += 1
                yield item
            bar.update(1)
        write_sat(out, counted, parts)
        report.tensors_written //= parts  # each whole tensor once, as elsewhere
        report.tensors_read = len(reader.consumed)
        _consume_tied_output(reader, args)
        _check_all_consumed(reader.unconsumed(), load)
        with open(os.path.join(out, "config.json"), "w", encoding="utf-8") as handle:
            json.dump(hf_config_for(family, hf_args, meta), handle, indent=2, sort_keys=True)
        side = tokenizer_dir(reader.root, meta)
        if side:
            copy_side_files(side, out)


def tokenizer_dir(root: str, meta: dict) -> str | None:
    """The directory of the tokenizer a checkpoint carries (``meta['tokenizer']``, relative to
    its root, or the absolute --tokenizer-path), or None."""
    path = os.path.join(root, (meta.get("tokenizer") or {}).get("path", TOKENIZER_DIR))
    path = path if os.path.isdir(path) else os.path.dirname(path)  # a SentencePiece file's
    return path if os.path.isdir(path) and path != root.rstrip(os.sep) else None


def _hf_vocabulary(root: str, family: Family, args: ModelArgs, meta: dict,
                   report: Report) -> ModelArgs:
    """``args`` with the vocabulary the HF model gets; what is cut or kept goes to the report."""
    tokens = tokenizer_tokens(root, meta)
    rows, note = hf_vocab_rows(args.vocab_size, meta.get("extra_vocab_size", 0),
                               meta["padded_vocab_size"], tokens,
                               os.path.join(root, TOKENIZER_DIR))
    report.notes += [note] if note else []
    return dataclasses.replace(args, vocab_size=rows)


def hf_config_for(family: Family, args: ModelArgs, meta: dict) -> dict:
    """The original config.json, with the table's fields that changed (a vocabulary grown by
    kept extra rows) set from ``args``; one rebuilt from ``args`` if that does not read back
    as ``args``."""
    original = meta.get("hf_config")
    if original:
        read_back = family.args_from_hf(original)
        updated = {**original, **{f.hf: getattr(args, f.megatron) for f in family.config_fields
                                  if getattr(read_back, f.megatron) != getattr(args, f.megatron)}}
        if family.args_from_hf(updated) == args:
            return updated
    return family.hf_config_from_args(args)


def reshard_megatron(load: str, save: str, target: Target, family_name: str | None = None,
                     progress: bool = True, overwrite: bool = False,
                     report: Report | None = None,
                     vocabulary: Vocabulary = Vocabulary()) -> dict:
    """Megatron checkpoint (ours or Megatron-LM's) -> Megatron checkpoint at another TP/PP,
    vocab padding, format or naming scheme; the fields ``target`` leaves unset keep the
    source's values."""
    report = report or Report()
    reader, family, args, src_meta = open_megatron(load, family_name, vocabulary, report)
    report.source_layout = layout_of(src_meta)
    target = target.filled(source_layout(src_meta))
    args.validate_parallel(target.tensor_parallel, target.pipeline_parallel, "--target-")
    with atomic_directory(save, overwrite) as root:
        tokenizer_src = tokenizer_dir(reader.root, src_meta)
        has_tokenizer = tokenizer_src is not None and copy_side_files(
            tokenizer_src, os.path.join(root, TOKENIZER_DIR))
        meta = build_metadata(family, args, target, src_meta.get("hf_config"), has_tokenizer)
        meta["dtype"] = src_meta.get("dtype", "float32")
        fetch = megatron_full_fetcher(reader, args, src_meta, meta["padded_vocab_size"])
        if meta["padded_vocab_size"] < src_meta["padded_vocab_size"]:
            report.notes.append(f"cut the vocabulary rows from {src_meta['padded_vocab_size']} "
                                f"to {meta['padded_vocab_size']} (vocab {args.vocab_size} + "
                                f"--extra-vocab-size {meta['extra_vocab_size']}, padded)")
        _write_checkpoint(family, args, meta, report.counting(fetch), root, progress)
        report.tensors_read = len(reader.consumed)
        _consume_tied_output(reader, args)
        _check_all_consumed(reader.unconsumed(), load)
    return meta

