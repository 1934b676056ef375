"""The chat tokenizer: loading one from a checkpoint's `llm/` directory, and the tiny one of the
`vila-hd-tiny` preset, built in code (no download).

The tiny tokenizer is byte-level BPE without merges: every byte of UTF-8 text is one token, so any
text round-trips, plus Qwen2's special tokens `<|endoftext|>`, `<|im_start|>`, `<|im_end|>` and
VILA's image placeholder `<image>`. It carries Qwen2's chat template, so prompts are built by
`apply_chat_template` exactly as for a real Qwen2 checkpoint.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import Ps3EdgeError

IMAGE_TOKEN = "<image>"
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (ENDOFTEXT, IM_START, IM_END, IMAGE_TOKEN)
DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."

# Qwen2's chat template (the one Qwen2-Instruct tokenizers ship): a default system turn, then
# <|im_start|>role\ncontent<|im_end|>\n per message, then the assistant header when asked for.
QWEN2_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def tiny_tokenizer():
    """A byte-level tokenizer with Qwen2's special tokens: 256 byte tokens + 4 specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())          # the 256 byte symbols
    vocab = {symbol: i for i, symbol in enumerate(alphabet)}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens(list(SPECIAL_TOKENS))                    # ids 256..259
    return PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token=IM_END, pad_token=ENDOFTEXT, unk_token=None,
        additional_special_tokens=[IM_START, IMAGE_TOKEN], chat_template=QWEN2_CHAT_TEMPLATE,
        model_max_length=1 << 20, clean_up_tokenization_spaces=False)


def load_tokenizer(path: Path):
    """The tokenizer saved in a checkpoint's `llm/` directory; it must know the image placeholder."""
    try:
        from transformers import AutoTokenizer
    except ImportError:
        raise Ps3EdgeError("VILA-HD needs transformers (pip install transformers tokenizers)") from None
    try:
        tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # transformers raises OSError / ValueError / its own types
        raise Ps3EdgeError(f"cannot load the tokenizer in {path}: {str(e).splitlines()[0]}") from None
    if IMAGE_TOKEN not in tok.get_vocab():           # VILA adds the placeholder; tolerate its absence
        tok.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    if not tok.chat_template:
        tok.chat_template = QWEN2_CHAT_TEMPLATE
    return tok


def stop_token_ids(tok) -> list[int]:
    """<|im_end|> and <|endoftext|> (the Qwen2 end-of-turn / end-of-text), as far as the vocab has them."""
    vocab = tok.get_vocab()
    ids = [vocab[t] for t in (IM_END, ENDOFTEXT) if t in vocab]
    if tok.eos_token_id is not None and tok.eos_token_id not in ids:
        ids.append(tok.eos_token_id)
    return ids
