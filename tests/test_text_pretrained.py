"""Frozen pretrained text encoders (transformers), their disk cache, and embeddings precomputed
by the user. The models are tiny random CLIP and T5 encoders built here with a tokenizer built
here, saved with save_pretrained and loaded through the from_pretrained path users take: nothing
is downloaded."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before transformers is imported: never the network
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from flowdiff.text import PrecomputedTextEncoder, PretrainedTextEncoder, TextCondition  # noqa: E402
from flowdiff.utils import UsageError  # noqa: E402

WORDS = "a an square circle at the top bottom left right red green blue big small".split()
SPECIAL = ["<pad>", "<unk>", "<bos>", "<eos>"]
LIMIT = 10  # the tokenizer's model_max_length


def save_tokenizer(folder: Path, kind: str) -> None:
    """A word-level tokenizer (the WORDS; CLIP: <bos> text <eos>, T5: text <eos>)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(SPECIAL + WORDS)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    template = "<bos> $A <eos>" if kind == "clip" else "$A <eos>"
    tokenizer.post_processor = processors.TemplateProcessing(
        single=template, special_tokens=[("<bos>", 2), ("<eos>", 3)]
    )
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, pad_token="<pad>", unk_token="<unk>", bos_token="<bos>",
        eos_token="<eos>", model_max_length=LIMIT,
    ).save_pretrained(folder)  # fmt: skip


def save_model(folder: Path, kind: str, seed: int = 0) -> Path:
    """A tiny random CLIP text model (width 16) or T5 encoder (width 12) in ``folder``."""
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    n = len(SPECIAL) + len(WORDS)
    if kind == "clip":
        config = CLIPTextConfig(
            vocab_size=n, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
            num_attention_heads=2, max_position_embeddings=LIMIT, pad_token_id=0, bos_token_id=2,
            eos_token_id=3,
        )  # fmt: skip
        model = CLIPTextModel(config)
    else:
        config = T5Config(
            vocab_size=n, d_model=12, d_kv=6, d_ff=24, num_layers=2, num_heads=2,
            pad_token_id=0, eos_token_id=3, decoder_start_token_id=0,
        )  # fmt: skip
        model = T5EncoderModel(config)
    model.save_pretrained(folder)
    save_tokenizer(folder, kind)
    return folder


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {kind: save_model(root / kind, kind) for kind in ("clip", "t5")}


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("FLOWDIFF_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def reference(folder: Path, kind: str, texts: list[str]) -> TextCondition:
    """What the model gives, run directly with transformers: the expected encoding."""
    from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

    tokenizer = AutoTokenizer.from_pretrained(folder)
    cls = CLIPTextModel if kind == "clip" else T5EncoderModel
    model = cls.from_pretrained(folder).eval()
    batch = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    mask = batch["attention_mask"].bool()
    tokens = out.last_hidden_state * mask[..., None]
    if kind == "clip":
        pooled = out.pooler_output
    else:
        pooled = torch.stack([h[m].mean(0) for h, m in zip(tokens, mask, strict=True)])
    return TextCondition(tokens, mask, pooled)


def same(a: TextCondition, b: TextCondition, atol: float = 0.0) -> bool:
    return (
        torch.equal(a.mask, b.mask)
        and torch.allclose(a.tokens, b.tokens, atol=atol, rtol=0)
        and torch.allclose(a.pooled, b.pooled, atol=atol, rtol=0)
    )
