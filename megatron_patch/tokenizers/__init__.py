"""Tokenizers keyed by the seed's ``--tokenizer-type`` names.

``build_tokenizer(tokenizer_type, tokenizer_model, extra_vocab_size=0,
make_vocab_size_divisible_by=128, tensor_model_parallel_size=1)`` returns a megatron-core
tokenizer (usable as ``GPTDatasetConfig.tokenizer``) with ``tokenize``, ``tokenize_batch``,
``detokenize``, ``eod``, ``pad`` (falls back to ``eod``), ``bos``, ``vocab_size`` (added tokens
included), ``padded_vocab_size`` and ``hf_tokenizer``. Names are matched case-insensitively.

=========================  =================================================================
``--tokenizer-type``       ``--tokenizer-model`` and what loads it
=========================  =================================================================
bloombpe                   BLOOM HF tokenizer directory      ``AutoTokenizer.from_pretrained``
llamabpe                   LLaMA HF tokenizer directory      (local files only,
falconbpe                  Falcon HF tokenizer directory      ``trust_remote_code=False``)
galacticabpe               Galactica HF tokenizer directory
chatglm                    ChatGLM-6B ``ice_text.model``,     ``tokenizers/glm.py`` (the
                           ChatGLM2/3 ``tokenizer.model``     releases' special tokens and
                           (or their directory)               whitespace pieces); a directory
glm130b                    GLM-130B ``ice_text.model``        with ``tokenizer.json`` (GLM-4):
                                                              ``AutoTokenizer``
HuggingFaceTokenizer       any HF tokenizer directory
SentencePieceTokenizer     a SentencePiece ``.model`` file   ``SentencePieceProcessor``
GPTSentencePieceTokenizer  same (Megatron-LM's name)
=========================  =================================================================

HF tokenizers tokenize as ``tokenizer(text).input_ids`` (special tokens such as LLaMA's BOS
included) and end documents with their EOS id, like Megatron-LM's ``HuggingFaceTokenizer``;
SentencePiece ones like Megatron-LM's ``GPTSentencePieceTokenizer`` (plain ``encode``, EOS id).
"""
from megatron_patch.tokenizers.builder import (TOKENIZER_TYPES, build_tokenizer,
                                               canonical_tokenizer_type)

__all__ = ["TOKENIZER_TYPES", "build_tokenizer", "canonical_tokenizer_type"]
