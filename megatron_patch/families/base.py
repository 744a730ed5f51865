"""What a family is: a declaration (HF config field table, fixed architecture values, sizes,
tokenizer name, weight-mapping table) plus hooks only where a family really differs."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Optional


@dataclass
class ModelArgs:
    """The shape of one model, in megatron-core's vocabulary (one typed config for the model)."""

    family: str
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_attention_heads: int
    num_query_groups: Optional[int] = None   # None: multi-head attention
    kv_channels: Optional[int] = None        # None: hidden_size / num_attention_heads
    vocab_size: int = 32000                  # the tokenizer's true vocabulary
    max_position_embeddings: int = 2048
    norm_epsilon: float = 1e-5
    rotary_base: float = 10000.0
    rope_scaling_factor: Optional[float] = None   # Llama-3.1 style scaling when set
    tie_embeddings: bool = False
    # The architecture: what a checkpoint's config.json decides and the model builder, the
    # converter and the generator read (never a family's name). A family fixes some of these
    # (Family.architecture) and reads the rest from config.json. The defaults are llama's,
    # which megatron_patch.json files written before these fields existed imply.
    normalization: str = "RMSNorm"         # RMSNorm | LayerNorm (with bias)
    activation: str = "silu"               # silu | gelu (erf) | gelu_tanh | relu
    gated_linear_unit: bool = True         # [gate; up] first MLP matrix (SwiGLU / GeGLU)
    add_bias_linear: bool = False          # a bias on every linear layer
    add_qkv_bias: bool = False             # a bias on the QKV projection only
    position_embedding_type: str = "rope"  # rope | rope_2d (ChatGLM-6B) | learned_absolute | alibi | none
    rotary_percent: float = 1.0            # fraction of the head dim that rotates
    rotary_interleaved: bool = False       # rotate pairs (x0, x1), (x2, x3).. (GLM-4), not halves
    position_embedding_offset: int = 0     # learned positions start at this row (OPT: 2)
    embedding_norm: bool = False           # a LayerNorm right after the word embeddings
    parallel_attention: bool = False       # attention and MLP read the same input (falcon)
    parallel_attention_norms: int = 1      # with parallel attention: 1 shared or 2 input norms
    post_sublayer_norms: bool = False      # a norm on attention's and the MLP's outputs (GLM-4-0414)
    deepnorm: bool = False                 # residual = sqrt(2 x layers) x normed input (GLM v1/130B)
    # GLM's prefix-LM: {"sop", "gmask", "mask", "pad"} token ids (layers/glm_positions.py);
    # None: a causal LM
    prefix_lm_ids: Optional[dict] = None
    # The HF naming this model was read in and is written back in, for a family with several
    # (chatglm: "glm", "glm4", "chatglm2"); "" for a family with one.
    checkpoint_layout: str = ""
    # A reward model: a scalar head (HF's ``score.weight``, layers/reward_head.py) in place of
    # the output layer, never tied to the embedding
    reward_head: bool = False

    def __post_init__(self):
        if self.num_query_groups is None:
            self.num_query_groups = self.num_attention_heads
        if self.kv_channels is None:
            self.kv_channels = self.hidden_size // self.num_attention_heads

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "ModelArgs":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})

    def validate_parallel(self, tensor_parallel: int, pipeline_parallel: int,
                          flag_prefix: str = "--") -> None:
        """Refuse layouts megatron-core cannot build, naming the flag (the converter's flags
        are ``--target-...``)."""
        tp_flag = f"{flag_prefix}tensor-model-parallel-size"
        pp_flag = f"{flag_prefix}pipeline-model-parallel-size"
        if tensor_parallel < 1:
            raise ValueError(f"{tp_flag} must be at least 1, got {tensor_parallel}")
        if self.num_attention_heads % tensor_parallel:
            raise ValueError(f"{tp_flag} {tensor_parallel} does not divide the "
                             f"{self.num_attention_heads} attention heads")
        groups = self.num_query_groups
        # Fewer key/value groups than ranks: each group is copied to TP / groups ranks.
        if groups % tensor_parallel and tensor_parallel % groups:
            raise ValueError(f"{tp_flag} {tensor_parallel} does not divide the {groups} query "
                             f"groups (num_key_value_heads), nor is it a multiple of them (then "
                             f"each key/value head is copied to TP / {groups} ranks)")
        if self.ffn_hidden_size % tensor_parallel:
            raise ValueError(f"{tp_flag} {tensor_parallel} does not divide ffn_hidden_size "
                             f"{self.ffn_hidden_size}")
        if pipeline_parallel < 1 or self.num_layers % pipeline_parallel:
            raise ValueError(f"{pp_flag} {pipeline_parallel} does not divide the "
                             f"{self.num_layers} layers")


def is_reward_config(hf_config: dict, path: str = "config.json") -> bool:
    """Whether an HF config.json is a reward model's: a ``*ForSequenceClassification``
    architecture with one label (more labels are a classifier, refused)."""
    architectures = hf_config.get("architectures") or []
    if not any(name.endswith("ForSequenceClassification") for name in architectures):
        return False
    labels = len(hf_config.get("id2label") or {}) or hf_config.get("num_labels", 2)
    if labels != 1:
        raise ValueError(f"{path}: a {architectures[0]} with {labels} labels is a classifier; "
                         "a reward model has one (num_labels=1)")
    return True


# The fields that tell one row of a family's sizes table from another.
SHAPE_FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads")

_REQUIRED = object()


@dataclass(frozen=True)
class ConfigField:
    """One HF ``config.json`` field <-> one :class:`ModelArgs` field.

    ``hf`` is the field written on the way back; ``aliases`` are older spellings also read
    (BLOOM's ``n_embed`` for ``hidden_size``). ``default`` is used when the HF field is absent
    or null: a value, or a function of the HF config dict. Without a default the field is
    required."""

    hf: str
    megatron: str
    default: Any = _REQUIRED
    aliases: tuple[str, ...] = ()

    def read(self, hf_config: dict, path: str) -> Any:
        for name in (self.hf, *self.aliases):
            if hf_config.get(name) is not None:
                return hf_config[name]
        if self.default is _REQUIRED:
            raise ValueError(f"{path}: config.json has no '{self.hf}'")
        return self.default(hf_config) if callable(self.default) else self.default


@dataclass(frozen=True)
class Family:
    """A model family declaration. See ``families/llama.py`` for the reference one."""

    name: str
    hf_model_types: tuple[str, ...]
    hf_architecture: str
    tokenizer: str                         # the seed's tokenizer name (megatron_patch.tokenizers)
    config_fields: tuple[ConfigField, ...]
    architecture: dict                     # ModelArgs architecture fields the family fixes
    hf_fixed: dict                         # fixed config.json values written on the way back
    sizes: dict[str, dict]                 # MODEL_SIZE -> ModelArgs fields
    weights: Callable[["ModelArgs"], list]  # ModelArgs -> weight-mapping rows
    # HF-only buffers computed from config.json (convert.derived.Derived): checked against the
    # config when a checkpoint stores them, then skipped; never written.
    derived_buffers: tuple = ()
    # Hooks for what a field table cannot say (special fields, refusals).
    read_extra: Callable[[dict, str], dict] = field(default=lambda cfg, path: {})
    write_extra: Callable[["ModelArgs"], dict] = field(default=lambda args: {})
    layer_spec: Optional[Callable] = None  # (ModelArgs, TransformerConfig) -> ModuleSpec
    # Replaces the config.json writer below for a layout the field table does not spell
    # (chatglm's remote-code ChatGLM2 config): ModelArgs -> dict, or None for the default.
    write_config: Callable[["ModelArgs"], Optional[dict]] = field(default=lambda args: None)

    @property
    def hf_reward_architecture(self) -> str | None:
        """transformers' one-label sequence classifier of this family (a reward model), or
        None where there is none (GLM-130B, ChatGLM-6B)."""
        if not self.hf_architecture.endswith("ForCausalLM"):
            return None
        return self.hf_architecture[:-len("ForCausalLM")] + "ForSequenceClassification"

    def args_from_hf(self, hf_config: dict, path: str = "config.json") -> ModelArgs:
        """HF config.json dict -> ModelArgs (raises ValueError naming the file and field). A
        ``*ForSequenceClassification`` config with one label is a reward model."""
        values = {f.megatron: f.read(hf_config, path) for f in self.config_fields}
        values.update(self.read_extra(hf_config, path))
        if is_reward_config(hf_config, path):
            values.update(reward_head=True, tie_embeddings=False)
        return ModelArgs(family=self.name, **{**self.architecture, **values})

    def rows(self, args: ModelArgs) -> list:
        """The weight-mapping rows of ``args``: the family's, with a reward model's ``score``
        in place of the output layer (whole on every tensor-parallel rank)."""
        rows = self.weights(args)
        if not args.reward_head:
            return rows
        from megatron_patch.convert.mapping import Row

        return [row for row in rows if row.megatron != "output_layer.weight"] + [
            Row("output_layer.weight", "score.weight", stage="last")]

    def hf_config_from_args(self, args: ModelArgs) -> dict:
        """ModelArgs -> a config.json dict that transformers loads as this family."""
        if args.reward_head and self.hf_reward_architecture is None:
            raise ValueError(f"{self.name} has no transformers sequence-classification class: "
                             "its reward models cannot be written as HF checkpoints")
        written = self.write_config(args)
        if written is not None:
            if args.reward_head:
                raise ValueError(f"{self.name}'s {args.checkpoint_layout} layout is remote code "
                                 "with no sequence-classification class: a reward model goes "
                                 "to HF in transformers' own layout")
            return written
        config = {"architectures": [self.hf_architecture], "model_type": self.hf_model_types[0]}
        config.update(self.hf_fixed)
        config.update({f.hf: getattr(args, f.megatron) for f in self.config_fields})
        config.update(self.write_extra(args))
        if args.reward_head:  # the layout's own class (chatglm: Glm or Glm4)
            causal = config["architectures"][0]
            config.update(architectures=[causal.replace("ForCausalLM",
                                                        "ForSequenceClassification")],
                          id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
        return config

    def args_for_size(self, size: str, **overrides) -> ModelArgs:
        """A row of the sizes table (``--model-size``), with overrides."""
        if size not in self.sizes:
            raise ValueError(f"unknown MODEL_SIZE '{size}' for {self.name}; "
                             f"choose one of: {', '.join(self.sizes)}")
        return ModelArgs(family=self.name,
                         **{**self.architecture, **self.sizes[size], **overrides})
