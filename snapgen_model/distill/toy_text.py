"""The toy world's text encoder: a word-level tokenizer built from the world's vocabulary and a tiny
`CLIPTextModelWithProjection`, saved with `save_pretrained` so that it loads through the same
`TextEncoderAdapter.from_pretrained` path as CLIP ViT-L does at full scale."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable

SPECIALS = ["<pad>", "<unk>", "<bos>", "<eos>"]


def words(texts: Iterable[str]) -> list[str]:
    """Sorted lower-case word vocabulary of `texts`."""
    vocab = set()
    for text in texts:
        vocab.update(re.findall(r"[a-z]+", text.lower()))
    return sorted(vocab)


def build_tokenizer(vocabulary: Iterable[str], max_length: int = 16):
    """A fast word-level tokenizer: <bos> words <eos>, padded with <pad>."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    ordered = list(dict.fromkeys(SPECIALS + [w for w in vocabulary if w not in SPECIALS]))  # unique, in order
    vocab = {tok: i for i, tok in enumerate(ordered)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace()])
    tok.post_processor = processors.TemplateProcessing(
        single="<bos> $A <eos>", special_tokens=[("<bos>", vocab["<bos>"]), ("<eos>", vocab["<eos>"])])
    from tokenizers import normalizers
    tok.normalizer = normalizers.Lowercase()
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>", model_max_length=max_length)


def build_tiny_clip(tokenizer, *, hidden: int = 128, layers: int = 2, heads: int = 4, projection: int = 128,
                    max_length: int = 16, seed: int = 0):
    """A randomly initialised tiny CLIP text encoder matched to `tokenizer`."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 4,
                         num_hidden_layers=layers, num_attention_heads=heads, projection_dim=projection,
                         max_position_embeddings=max_length, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    return CLIPTextModelWithProjection(cfg)


def save_text_encoder(model, tokenizer, folder: str | Path) -> Path:
    """`save_pretrained` of model and tokenizer into one folder (loadable by TextEncoderAdapter)."""
    folder = Path(folder)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
