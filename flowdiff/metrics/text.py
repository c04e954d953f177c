"""Prompt adherence of images: R-precision and CLIP score (pure functions of embeddings, or of a
CLIP checkpoint the user has).

- **R-precision** (Xu et al., AttnGAN 2018, with R = 1): each image ranks its own prompt among
  :data:`R_CANDIDATES` - 1 distractor captions by cosine similarity in a contrastive embedding
  (:mod:`flowdiff.metrics.contrastive`); the share ranking it first. Distractors are drawn from
  the captions of *other groups* (another wording of the same content is no mismatch: the
  groups are the caption's words, or the data's own attributes). Chance: 1 / R_CANDIDATES.
- **CLIP score** (Hessel et al., 2021): 100 * max(cos(E_I(image), E_T(prompt)), 0), averaged,
  with a CLIP model loaded by ``transformers`` from a local folder.
"""

from __future__ import annotations

import torch
from torch import Tensor

from flowdiff.utils import UsageError

R_CANDIDATES = 32


def r_precision(
    image_embeddings: Tensor,
    caption_embeddings: Tensor,
    truth: Tensor,
    groups: Tensor,
    generator: torch.Generator,
    candidates: int = R_CANDIDATES,
) -> float:
    """Share of images whose own caption is the most similar of ``candidates``.

    image_embeddings: (N, d) unit vectors; caption_embeddings: (M, d) unit vectors of the caption
    pool; truth: (N,) index in the pool of each image's caption; groups: (M,) ids, captions of
    one group never distract each other. Distractors: ``candidates - 1`` distinct pool captions
    of other groups (all of them when fewer), drawn from ``generator``.
    """
    if len(image_embeddings) != len(truth) or len(caption_embeddings) != len(groups):
        raise ValueError(
            f"r_precision: {len(image_embeddings)} images for {len(truth)} captions, "
            f"{len(caption_embeddings)} pool captions for {len(groups)} groups"
        )
    hits = 0
    similarity = image_embeddings.double() @ caption_embeddings.double().T  # (N, M)
    for i, j in enumerate(truth.tolist()):
        others = (groups != groups[j]).nonzero().squeeze(1)
        if len(others) == 0:
            raise ValueError("r_precision needs captions of at least two groups")
        pick = others[torch.randperm(len(others), generator=generator)[: candidates - 1]]
        hits += bool(similarity[i, j] > similarity[i, pick].max())
    return hits / max(len(truth), 1)


def check_clip(path: str) -> str | None:
    """None when CLIP score can be computed from ``path``; else why not (``transformers``
    missing: the score is skipped, with this note). A folder that does not exist is refused."""
    from pathlib import Path

    if not Path(path).is_dir():
        raise UsageError(f"--clip {path!r}: no such folder (a local CLIP checkpoint folder)")
    import importlib.util

    if importlib.util.find_spec("transformers") is None:
        return "CLIP score skipped: transformers is not installed (pip install 'flowdiff[text]')"
    return None


class ClipScore:
    """CLIP score of images (N, C, H, W) in [-1, 1] against their prompts, with the CLIP model in
    the local folder ``path`` (``transformers``' ``CLIPModel`` and ``CLIPProcessor``); images are
    resized by the processor as CLIP was trained (grey images repeated to RGB)."""

    def __init__(self, path: str):
        from transformers import CLIPModel, CLIPProcessor

        try:
            self.model = CLIPModel.from_pretrained(path, local_files_only=True).eval()
            self.processor = CLIPProcessor.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as err:
            raise UsageError(f"--clip {path!r}: cannot load a CLIP model from it ({err})") from err

    @torch.no_grad()
    def __call__(self, images: Tensor, prompts: list[str], batch_size: int = 100) -> float:
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
        scores = []
        for i in range(0, len(images), batch_size):
            x = images[i : i + batch_size]
            x = x.expand(-1, 3, -1, -1) if x.shape[1] == 1 else x
            pixels = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
            inputs = self.processor(
                text=prompts[i : i + batch_size], images=list(pixels.permute(0, 2, 3, 1).numpy()),
                return_tensors="pt", padding=True, truncation=True,
            )  # fmt: skip
            out = self.model(**inputs)
            cos = torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds)
            scores.append(100 * cos.clamp(min=0))
        return torch.cat(scores).double().mean().item()
