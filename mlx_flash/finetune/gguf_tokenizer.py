"""The tokenizer a GGUF file describes, as an mlx-lm ``TokenizerWrapper``.

A GGUF carries no ``tokenizer.json``: llama.cpp stores the vocabulary
(``tokenizer.ggml.tokens``), the BPE merges, each token's type (3 marks a
control token such as ``<|im_start|>``), the special token ids and the chat
template as metadata, and names the pre-tokenizer (how text is split before
BPE runs) in ``tokenizer.ggml.pre``. This module rebuilds a Hugging Face
``tokenizers`` tokenizer from those, wraps it in ``PreTrainedTokenizerFast``
(so ``apply_chat_template`` renders the file's template) and in mlx-lm's
``TokenizerWrapper`` with its byte-level streaming detokenizer, which is
what mlx-lm's data sets and ``generate`` expect.

Byte-level BPE (``tokenizer.ggml.model == "gpt2"``) is supported, with the
pre-tokenizers of ``PRE_TOKENIZERS``; a SentencePiece vocabulary
(``"llama"``) is not yet.
"""

from typing import Callable, Dict

from .gguf_file import GGUFError

#: llama.cpp token types (llama.h): these stay whole when they occur in text.
CONTROL, USER_DEFINED = 3, 4


def _byte_level(use_regex: bool = True):
    from tokenizers import pre_tokenizers

    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=use_regex)


def _gpt2():
    return _byte_level()


def _digits_then_gpt2():
    # llama.cpp's "smollm" (and StarCoder's) split every digit on its own
    # before GPT-2's regex, as SmolLM2's tokenizer.json does with Digits.
    from tokenizers import pre_tokenizers

    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _byte_level()])


def _qwen2():
    from tokenizers import Regex, pre_tokenizers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    return pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"), _byte_level(use_regex=False)]
    )


#: ``tokenizer.ggml.pre`` -> the pre-tokenizer that splits text as llama.cpp does.
PRE_TOKENIZERS: Dict[str, Callable] = {
    "default": _gpt2,
    "gpt2": _gpt2,
    "gpt-2": _gpt2,
    "smollm": _digits_then_gpt2,
    "starcoder": _digits_then_gpt2,
    "qwen2": _qwen2,
}


def _token(metadata: dict, key: str):
    """The text of the token whose id metadata ``key`` holds, or None."""
    if key not in metadata:
        return None
    index = int(metadata[key].item())
    tokens = metadata["tokenizer.ggml.tokens"]
    return tokens[index] if 0 <= index < len(tokens) else None


def _flag(metadata: dict, key: str) -> bool:
    return key in metadata and bool(metadata[key].item())


def check(metadata: dict) -> None:
    """Raise ``GGUFError`` unless ``build`` takes the tokenizer that
    ``metadata`` (the file's string and scalar values) describes."""
    kind = metadata.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise GGUFError(f"tokenizer model {kind!r} is not supported (only 'gpt2', byte-level BPE, is)")
    pre = metadata.get("tokenizer.ggml.pre", "default")
    if pre not in PRE_TOKENIZERS:
        raise GGUFError(f"pre-tokenizer {pre!r} is not supported (supported: {', '.join(PRE_TOKENIZERS)})")


def build(metadata: dict):
    """mlx-lm ``TokenizerWrapper`` for the tokenizer in GGUF ``metadata``.

    ``metadata`` is the dictionary ``mx.load(path, return_metadata=True)``
    returns (lists for the string arrays, ``mx.array`` for numbers).
    Raises ``GGUFError`` for a tokenizer this module does not build.
    """
    from mlx_lm.tokenizer_utils import BPEStreamingDetokenizer, TokenizerWrapper
    from tokenizers import AddedToken, Tokenizer, decoders, models, processors
    from transformers import PreTrainedTokenizerFast

    check(metadata)
    tokens = metadata["tokenizer.ggml.tokens"]
    merges = [tuple(merge.split(" ", 1)) for merge in metadata.get("tokenizer.ggml.merges", [])]

    tokenizer = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tokenizer.pre_tokenizer = PRE_TOKENIZERS[metadata.get("tokenizer.ggml.pre", "default")]()
    tokenizer.decoder = decoders.ByteLevel()
    types = metadata.get("tokenizer.ggml.token_type")
    types = types.tolist() if types is not None else []
    tokenizer.add_special_tokens(
        [AddedToken(tokens[i], special=True, normalized=False) for i, t in enumerate(types) if t == CONTROL]
    )
    tokenizer.add_tokens(
        [AddedToken(tokens[i], special=False, normalized=False) for i, t in enumerate(types) if t == USER_DEFINED]
    )
    bos = _token(metadata, "tokenizer.ggml.bos_token_id")
    if _flag(metadata, "tokenizer.ggml.add_bos_token") and bos is not None:
        bos_id = int(metadata["tokenizer.ggml.bos_token_id"].item())
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, bos_id)]
        )

    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=bos,
        eos_token=_token(metadata, "tokenizer.ggml.eos_token_id"),
        unk_token=_token(metadata, "tokenizer.ggml.unknown_token_id"),
        pad_token=_token(metadata, "tokenizer.ggml.padding_token_id"),
        chat_template=metadata.get("tokenizer.chat_template"),
        clean_up_tokenization_spaces=False,
    )
    return TokenizerWrapper(wrapped, BPEStreamingDetokenizer)
