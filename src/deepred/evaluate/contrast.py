"""The other personas an answer is contrasted with: "this persona or another?", beside "persona or assistant?".

Every bundled persona (`resources/personas/*.yaml`) other than the one scored, plus the scored persona's own
`style.contrast_anchors` (sentences in the voices a tune must not drift into). Style uses two things from them:
- their anchor sentences, as negatives beside the generic-assistant anchors (embeddings.py, `contrast_similarities`);
- their style fields: a word that belongs to another persona's fields too (Deep Red's and the butler's `shall`,
  `duty`) is shared, and shared words alone do not make an answer in style (style.py, `own_fields`).
A persona added to `resources/personas/` joins the contrast of every other one without a change here.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

from ..persona import Persona, bundled_persona_path, load_persona

OWN_CONTRAST = "contrast_anchors"  # the group name of the persona file's own contrast sentences


@dataclass(frozen=True)
class Contrast:
    """Anchor sentences per contrast group (another persona's title, or `contrast_anchors`), and the other
    personas' style-field patterns."""

    anchors: dict[str, list[str]]
    fields: tuple[re.Pattern, ...]


def other_bundled_personas(persona: Persona) -> list[Persona]:
    """The bundled personas other than `persona` (by file or by name), in file-name order."""
    found = []
    for path in sorted(bundled_persona_path().parent.glob("*.yaml")):
        other = load_persona(path)
        if other.file != persona.file and other.name != persona.name:
            found.append(other)
    return found


@lru_cache(maxsize=16)
def contrast_of(persona: Persona) -> Contrast:
    others = other_bundled_personas(persona)
    anchors = {other.title: list(other.persona_anchors) for other in others}
    if persona.contrast_anchors:
        anchors[OWN_CONTRAST] = list(persona.contrast_anchors)
    fields = tuple(pattern for other in others for pattern in other.style_fields.values())
    return Contrast(anchors, fields)


def shared_spans(text: str, persona: Persona) -> list[tuple[int, int]]:
    """Where the other personas' style fields match in `text`."""
    return [m.span() for pattern in contrast_of(persona).fields for m in pattern.finditer(text)]
