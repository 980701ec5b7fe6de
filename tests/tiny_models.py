"""The tiny random model directory of the tests (and of the benchmarks that measure where host work weighs most):
a word-level tokenizer with a chat template, and a 2-layer transformers LLaMA saved with it."""

from pathlib import Path

TEST_WORDS = ["the", "answer", "is", "a", "b", "c", "yes", "no", "question", ":", "what", "colour", "sky", "blue"]
TEST_WORDS += ["why", "?", ".", "passage", "title"]


def word_level_tokenizer(vocab: dict[str, int], specials: list[str], template: str, **tokens: str):
    """A whitespace-split word-level tokenizer of ``vocab`` (with ``<unk>``), adding ``tokens["bos_token"]`` before
    each text when there is one, with ``specials`` as special tokens and ``template`` as its chat template."""
    import tokenizers
    import transformers

    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    if "bos_token" in tokens:
        bos = tokens["bos_token"]
        backend.post_processor = tokenizers.processors.TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, vocab[bos])]
        )
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", **tokens)
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    tokenizer.chat_template = template
    return tokenizer


def word_tokenizer():
    """A word-level tokenizer (pad 0, bos 1, eos 2, ``<user>`` 4, ``<bot>`` 5; 25 tokens) that adds BOS like
    LLaMA's, with a tiny chat template: fully predictable ids for data and CLI tests."""
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, "<user>": 4, "<bot>": 5}
    vocab |= {w: i + len(vocab) for i, w in enumerate(TEST_WORDS)}
    template = "{% for m in messages %}<user> {{ m['content'] }} {% endfor %}<bot>"
    return word_level_tokenizer(
        vocab, ["<user>", "<bot>"], template, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def save_tiny_llama(directory: Path, tokenizer) -> Path:
    """A tiny random LLaMA (seed 0: the same weights every time) with ``tokenizer``, saved as a HF directory."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        vocab_size=32,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
