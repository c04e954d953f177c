"""A frozen pretrained text encoder loaded with ``transformers``: a CLIP text model or a T5
encoder, from a local directory or a hub name (``pip install 'flowdiff[text]'``).

Its weights never enter the flow model: the Hugging Face model is held outside the module tree
(not a submodule), so the flow model's ``state_dict``, its checkpoints, its EMA copy and its
optimizer never see it, and the checkpoint records the encoder by its ``path`` (init_args) alone;
``flowdiff sample`` loads it again from there. It is loaded only when a text must be encoded
that the embedding cache does not hold: training on cached captions never loads it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from flowdiff.config import Recorded
from flowdiff.text.cache import (
    EmbeddingTable,
    Shared,
    cache_dir,
    cache_key,
    fingerprint,
    write_table,
)
from flowdiff.text.condition import TextCondition
from flowdiff.text.encoders import TextEncoder
from flowdiff.utils import UsageError

MODEL_TYPES = {"clip": "clip", "clip_text_model": "clip", "t5": "t5", "mt5": "t5", "umt5": "t5"}
UNBOUNDED = 10**6  # tokenizers without a limit say model_max_length = 1e30


def import_transformers():
    try:
        import transformers
    except ImportError as err:
        raise UsageError(
            "the pretrained text encoder needs transformers: pip install 'flowdiff[text]'"
        ) from err
    if not sys.stderr.isatty():
        transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()  # flowdiff says what matters itself
    try:
        from huggingface_hub.utils import logging as hub_logging

        hub_logging.set_verbosity_error()  # a failed request is said once, in the error line
    except ImportError:
        pass
    return transformers


def reason(err: Exception) -> str:
    """The first line of an exception's message (its type when it has none)."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def locate(path: str, what: str = "path") -> str:
    """``path`` as given when it is a local directory or a hub name; a UsageError for a local
    path (absolute, ``./``, ``../``, ``~``) that does not exist, or a file."""
    local = Path(path).expanduser()
    if local.is_dir():
        return str(local)
    if local.exists() or path.startswith(("/", "./", "../", "~", ".\\")) or local.is_absolute():
        state = "is not a directory" if local.exists() else "does not exist"
        raise UsageError(
            f"model.text_encoder.init_args.{what} {path!r} {state} (a folder written by "
            "save_pretrained, or a hub name such as openai/clip-vit-large-patch14)"
        )
    return path


def load_config(path: str):
    """The model's config (config.json only, no weights); one clear line when it cannot load."""
    transformers = import_transformers()
    try:
        return transformers.AutoConfig.from_pretrained(locate(path))
    except UsageError:
        raise
    except Exception as err:
        where = "" if Path(path).expanduser().is_dir() else "no such folder, and the hub: "
        raise UsageError(
            f"model.text_encoder.init_args.path {path!r}: cannot load it ({where}{reason(err)})"
        ) from err


def text_config(config):
    """``(kind, text config)``: 'clip' or 't5'; a full CLIP config gives its text part."""
    kind = MODEL_TYPES.get(config.model_type)
    if kind is None:
        raise UsageError(
            f"model.text_encoder: a {config.model_type!r} model; PretrainedTextEncoder takes CLIP "
            f"text models and T5 encoders (model_type {', '.join(sorted(MODEL_TYPES))})"
        )
    return kind, getattr(config, "text_config", None) or config


class PretrainedTextEncoder(Recorded, TextEncoder):
    """A frozen CLIP text model or T5 encoder: tokens = its last hidden states (b, l, dim),
    mask = the attention mask, pooled = CLIP's pooled output (the final layer-normed state at
    the end-of-text token) or, for T5, the mean of the caption's token states.

    Args:
        path: a folder written by ``save_pretrained`` (``config.json`` and the weights), or a hub
            name (downloaded by ``transformers`` where a network exists).
        tokenizer: the tokenizer's folder or hub name when it is not beside the model (as in
            Stable Diffusion's ``tokenizer/`` and ``text_encoder/`` folders).
        max_length: tokens a caption keeps (None: the tokenizer's ``model_max_length``, e.g. 77
            for CLIP; CLIP's position table otherwise, or 512); longer prompts are cut with a
            warning.
        batch_size: captions a forward pass while the cache is computed.
        cache: compute the training captions' embeddings once into the disk cache
            (``<flowdiff cache>/text``) and read them from there; False: run the model on every
            batch.
    """

    trainable = False

    def __init__(
        self,
        path: str | None = None,
        tokenizer: str | None = None,
        max_length: int | None = None,
        batch_size: int = 64,
        cache: bool = True,
    ):
        super().__init__()
        if path is None:
            raise UsageError(
                "PretrainedTextEncoder needs a path: --model.text_encoder.init_args.path DIR "
                "(a save_pretrained folder) or a hub name"
            )
        if batch_size < 1 or (max_length is not None and max_length < 1):
            raise UsageError(
                f"text encoder: batch_size ({batch_size}) and max_length ({max_length}) must be "
                "positive"
            )
        config = load_config(path)
        self.kind, text = text_config(config)
        self.dim = int(text.hidden_size if self.kind == "clip" else text.d_model)
        self.path, self.batch_size, self.use_cache = path, batch_size, cache
        self.shared = Shared()
        limit = int(min(self.tokenizer.model_max_length, UNBOUNDED))
        if limit >= UNBOUNDED:
            limit = int(getattr(text, "max_position_embeddings", 0) or 512)
        self.max_length = int(max_length) if max_length is not None else limit
        # Where the module lives (Lightning moves buffers): prompts are encoded there.
        self.register_buffer("anchor", torch.empty(0), persistent=False)

    @classmethod
    def width(cls, init_args: dict) -> int:
        """The model's hidden size, read from its config.json (no weights are loaded)."""
        if init_args.get("path") is None:
            raise UsageError("model.text_encoder.init_args.path is required")
        kind, text = text_config(load_config(init_args["path"]))
        return int(text.hidden_size if kind == "clip" else text.d_model)

    # -- the model, loaded when a text is not in the cache --------------------------------------

    @property
    def tokenizer(self):
        if self.shared.tokenizer is None:
            transformers = import_transformers()
            given = self.init_args.get("tokenizer")
            where = locate(given or self.path, "tokenizer" if given else "path")
            try:
                self.shared.tokenizer = transformers.AutoTokenizer.from_pretrained(where)
            except Exception as err:
                raise UsageError(
                    f"text encoder tokenizer {where!r}: cannot load it ({reason(err)})"
                ) from err
        return self.shared.tokenizer

    @property
    def model(self):
        if self.shared.model is None:
            transformers = import_transformers()
            cls = transformers.CLIPTextModel if self.kind == "clip" else transformers.T5EncoderModel
            try:
                model = cls.from_pretrained(locate(self.path))
            except Exception as err:
                raise UsageError(
                    f"text encoder {self.path!r}: cannot load its weights ({reason(err)})"
                ) from err
            self.shared.model = model.eval().requires_grad_(False)
        return self.shared.model

    @torch.no_grad()
    def run(self, texts: list[str], device: torch.device) -> TextCondition:
        """The model on ``texts`` (non-empty), on ``device``."""
        model = self.model
        if next(model.parameters()).device != device:
            model.to(device)
        batch = self.tokenizer(
            list(texts), padding=True, truncation=True, max_length=self.max_length,
            return_tensors="pt",
        )  # fmt: skip
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        out = model(input_ids=ids, attention_mask=mask)
        mask = mask.bool()
        tokens = out.last_hidden_state.float() * mask[..., None]
        if self.kind == "clip":
            pooled = out.pooler_output.float()
        else:
            pooled = tokens.sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        return TextCondition(tokens, mask, pooled)

    def encode(self, texts: list[str]) -> TextCondition:
        """Texts in the cache are read from it; the model encodes the others (prompts)."""
        device = self.anchor.device
        table = self.shared.table
        missing = table.missing(texts) if table is not None else list(dict.fromkeys(texts))
        if not missing:
            return table.lookup(texts).to(device)
        if len(missing) == len(set(texts)):
            return self.run(texts, device)
        found = [i for i, t in enumerate(texts) if t in table.rows]
        other = [i for i, t in enumerate(texts) if t not in table.rows]
        both = TextCondition.cat(
            [table.lookup([texts[i] for i in found]).to(device),
             self.run([texts[i] for i in other], device)]
        )  # fmt: skip
        order = torch.empty(len(texts), dtype=torch.long)
        order[torch.tensor(found + other)] = torch.arange(len(texts))
        return both[order.to(device)]

    def prompt_warnings(self, texts: list[str]) -> list[str]:
        lengths = [len(ids) for ids in self.tokenizer(list(texts))["input_ids"]]
        return [
            f"prompt cut to the text encoder's {self.max_length} tokens ({n} given): {text!r}"
            for text, n in zip(texts, lengths, strict=True)
            if n > self.max_length
        ]

    # -- the cache --------------------------------------------------------------------------------

    def identity(self) -> dict:
        """What the embeddings depend on: the model's and tokenizer's files (a hub model: its
        name and revision), the pooling and the token limit."""
        return {
            "class": "PretrainedTextEncoder", "kind": self.kind, "max_length": self.max_length,
            "model": files_identity(self.path, "config.json"),
            "tokenizer": files_identity(self.init_args["tokenizer"], "tokenizer_config.json")
            if self.init_args.get("tokenizer") else "beside the model",
        }  # fmt: skip

    def prepare(self, captions: list[str]) -> None:
        """Read the embeddings of the training ``captions`` from the disk cache, computing them
        first when no entry holds this encoder and this caption set."""
        if not self.use_cache:
            return
        captions = sorted({c for c in captions if c.strip()})
        key = cache_key(self.identity(), captions)
        if self.shared.key == key:
            return
        folder = cache_dir(self.kind, key)  # the same files elsewhere: the same entry
        if not (folder / "text.json").is_file():
            self._compute(captions, folder)
        self.shared.table = EmbeddingTable.load(folder, f"text embedding cache {folder}")
        self.shared.key = key

    def _compute(self, captions: list[str], folder: Path) -> None:
        from tqdm import tqdm

        lengths = [len(ids) for ids in self.tokenizer(captions)["input_ids"]]
        long = [c for c, n in zip(captions, lengths, strict=True) if n > self.max_length]
        if long:
            print(
                f"flowdiff: warning: {len(long)} of {len(captions)} training captions are longer "
                f"than the text encoder's {self.max_length} tokens and are cut (e.g. {long[0]!r})",
                file=sys.stderr,
            )
        length = max(1, min(max(lengths, default=1), self.max_length))
        device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
            else torch.device("cpu")  # fmt: skip
        order = sorted(range(len(captions)), key=lengths.__getitem__)  # batches of like lengths

        def fill(tokens, mask, pooled) -> None:
            bar = tqdm(total=len(captions), desc="text embeddings", unit="caption",
                       disable=not sys.stderr.isatty())  # fmt: skip
            for start in range(0, len(order), self.batch_size):
                rows = order[start : start + self.batch_size]
                out = self.run([captions[i] for i in rows], device).to("cpu")
                n = out.tokens.shape[1]
                tokens[rows, :n], mask[rows, :n] = out.tokens.numpy(), out.mask.numpy()
                pooled[rows] = out.pooled.numpy()
                bar.update(len(rows))
            bar.close()

        info = {"encoder": self.init_args, "identity": self.identity(), "captions": len(captions)}
        write_table(folder, captions, length, self.dim, fill, info)
        self.shared.model = None  # training reads the cache; a prompt loads the model again


def files_identity(path: str, filename: str) -> dict:
    """A local folder: the fingerprint of its files; a hub name: the name and the revision
    (commit) of the snapshot ``transformers`` resolved."""
    local = Path(path).expanduser()
    if local.is_dir():
        return {"files": fingerprint(local)}
    from transformers.utils import cached_file

    snapshot = Path(cached_file(path, filename)).parent
    return {"hub": path, "revision": snapshot.name}
