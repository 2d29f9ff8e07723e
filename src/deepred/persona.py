"""The persona file: everything that makes one character, read from YAML and checked before any work starts.

Shared by every stage that speaks as the persona: evaluation scores against it, validation counts its system prompts
and categories, merge and deploy ask its sample question, and the model cards describe it.

Every problem is one line, `FILE:LINE: key: what is wrong; what to do`. The bundled Deep Red file
(`resources/personas/deepred.yaml`) is the default and the worked example (README, "Your own persona").
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from .era import kind_label, later_year_pattern, parse_cutoff, year_label, years_after
from .errors import DeepRedError
from .yaml_file import read_yaml_with_lines

TOP_LEVEL = {"name", "title", "description", "system_prompts", "prompts", "heldout_prompts", "sample_question",
             "categories", "temporal_category", "style", "knowledge", "targets", "out_of_character"}
STYLE_KEYS = {"fields", "persona_anchors", "generic_anchors", "contrast_anchors", "judge_traits"}
KNOWLEDGE_KEYS = {"cutoff", "later_centuries", "later_terms", "deflections", "horizon"}
QUOTED_DATED_TOPIC = re.compile(r".+:\s*\d{3,4}")  # 'television: 1936' in quotes: text, not {television: 1936}


def dated_text_problem(text: str) -> str:
    """Why a topic that reads `topic: year` came out of YAML as text, and how to write it."""
    topic, _, year = text.rpartition(":")
    if not year[:1].isspace():  # television:1936 is one plain word to YAML, quoted or not
        return (f"{text!r} is text, not a topic and its year: YAML needs a space after the colon; write it as: "
                f"{topic.strip()}: {year.strip()}")
    return f"{text!r} is text because of its quotes, not a topic and its year; write it without quotes: {text}"
HORIZON_KEYS = {"topics", "questions", "years", "year_questions", "replies", "facts", "dating"}
DATING_KEYS = {"later", "within"}
FACT_KEYS = {"question", "answer", "subject", "year"}  # subject and year: for dating


@dataclass(frozen=True)
class Targets:
    """Pass marks of the four metrics; a persona file overrides only the ones it names."""

    style: float = 0.80           # specification: > 80 % of responses in style
    voice: float = 0.90           # ours: >= 90 % in character ...
    voice_category: float = 0.80  # ... and every category >= 80 % ("consistent across prompts")
    temporal: float = 0.95        # specification: > 95 %
    coherence: float = 0.90       # ours: the specification only asks for a subjective check


@dataclass(frozen=True)
class Horizon:
    """Training material about what lies after the cutoff (horizon.py makes the rows): questions from topic and year
    templates, deflections from reply templates ({subject}, {cutoff}), and period facts still answered."""

    topics: list[str]
    questions: list[str]  # each with {topic}
    years: list[int]
    year_questions: list[str]  # each with {year}
    replies: list[str]
    facts: list[dict]  # {question, answer}, and with dating {subject, year}; expect_any: words a right answer names
    topic_years: dict[str, int] = field(default_factory=dict)  # a topic's year, where the file gives one
    dating: dict[str, str] | None = None  # {later, within}: the sentence that places a subject in time first


@dataclass(frozen=True, eq=False)  # compared and hashed by identity: detectors cache per persona
class Persona:
    name: str
    title: str
    description: str
    file: Path
    system_prompts: dict[str, str]
    prompts_path: Path
    categories: list[str]
    temporal_category: str
    style_fields: dict[str, re.Pattern]
    persona_anchors: list[str]
    generic_anchors: list[str]
    judge_traits: str
    cutoff: int                   # the last year known; BC years negative (era.py)
    later_terms: re.Pattern
    later_years: re.Pattern       # a later year or century, as that era writes it (era.later_year_pattern)
    years_after: str              # the bare four-digit later years, for "by 1980"
    deflections: re.Pattern | None
    targets: Targets = field(default_factory=Targets)
    sample_question: str | None = None  # what deploy and merge ask to show the model answers (default: prompt 1)
    heldout_prompts_path: Path | None = None  # prompts no training data or tuning decision may use
    horizon: Horizon | None = None  # training material about later years (knowledge.horizon)
    contrast_anchors: tuple[str, ...] = ()  # voices this persona is not (style.contrast_anchors), beside the
    #                                         other bundled personas' anchors (evaluate/contrast.py)
    out_of_character: re.Pattern | None = None  # the file's own out-of-character phrases, beside the built-in ones

    @property
    def evaluation_system_prompt(self) -> str:
        return self.system_prompts["evaluation"]

    @property
    def later_kind(self) -> str:
        """The temporal kind of a question about after the cutoff: post_<cutoff year> (post_44bc for 44 BC)."""
        return kind_label(self.cutoff)

    @property
    def cutoff_label(self) -> str:
        """The cutoff as prose writes it: 1969, AD 180, 44 BC."""
        return year_label(self.cutoff)


def bundled_persona_path() -> Path:
    return Path(str(resources.files("deepred") / "resources" / "personas" / "deepred.yaml"))


def resolve_persona_path(path: str | Path | None) -> Path:
    """A path as given, else a bundled persona of that file name (`--persona butler.yaml`), else Deep Red."""
    if not path:
        return bundled_persona_path()
    given = Path(path).expanduser()
    bundled = bundled_persona_path().parent / given.name
    if not given.is_file() and given.name == str(path) and bundled.is_file():
        return bundled
    return given


def default_persona() -> Persona:
    return load_persona(None)


def load_persona(path: str | Path | None) -> Persona:
    """The persona at `path` (default: the bundled Deep Red); a one-line DeepRedError on any problem."""
    return _load(resolve_persona_path(path).resolve())


@lru_cache(maxsize=16)
def _load(path: Path) -> Persona:
    if not path.is_file():
        raise DeepRedError(f"persona file not found: {path}; pass --persona FILE.yaml (see README, 'Your own persona')")
    data, lines = read_yaml_with_lines(path)
    return _Reader(path, data, lines).persona()


def _dotted(where: tuple) -> str:
    text = ""
    for part in where:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


class _Reader:
    """Typed access to the YAML data; every refusal names the file, line and key."""

    def __init__(self, path: Path, data: Any, lines: dict[tuple, int]):
        self.path, self.data, self.lines = path, data, lines

    def fail(self, where: tuple, problem: str) -> DeepRedError:
        line = self.lines.get(where) or self.lines.get(where[:-1]) or 1
        return DeepRedError(f"{self.path}:{line}: {_dotted(where) + ': ' if where else ''}{problem}")

    def get(self, where: tuple, required: bool = True) -> Any:
        value = self.data
        for i, key in enumerate(where):
            if not isinstance(value, dict):
                raise self.fail(where[:i], "expected a mapping of keys; see resources/personas/deepred.yaml")
            if key not in value:
                if not required:
                    return None
                top = "" if i else " at the top level"
                raise self.fail(where[:i], f"missing {key!r}{top}; add it (see resources/personas/deepred.yaml)")
            value = value[key]
        return value

    def text(self, where: tuple, required: bool = True) -> str | None:
        value = self.get(where, required)
        if value is None and not required:
            return None
        if not isinstance(value, str) or not value.strip():
            raise self.fail(where, f"expected text, got {_shown(value)}")
        return value.strip()

    def texts(self, where: tuple, minimum: int = 1, required: bool = True) -> list[str]:
        value = self.get(where, required)
        if value is None and not required:
            return []
        if not isinstance(value, list) or len(value) < minimum:
            raise self.fail(where, f"expected a list of at least {minimum} text item(s), got {_shown(value)}")
        for i, item in enumerate(value):
            if not isinstance(item, str) or not item.strip():
                raise self.fail(where + (i,), f"expected text, got {_shown(item)}")
        return list(value)

    def pattern(self, where: tuple, required: bool = True) -> re.Pattern | None:
        """A list of patterns as one case-insensitive regex anchored at a word start: \\b(?:a|b|c)."""
        items = self.texts(where, required=required)
        if not items:
            return None
        for i, item in enumerate(items):
            try:
                re.compile(item)
            except re.error as exc:
                raise self.fail(where + (i,), f"bad regular expression {item!r} ({exc}); fix the pattern "
                                              "(single-quote it in YAML to keep backslashes)") from None
        return re.compile(r"\b(?:" + "|".join(items) + ")", re.IGNORECASE)

    def mapping(self, where: tuple, allowed: set[str] | None = None, required: bool = True) -> dict:
        value = self.get(where, required)
        if value is None and not required:
            return {}
        if not isinstance(value, dict):
            raise self.fail(where, f"expected a mapping of keys, got {_shown(value)}")
        unknown = sorted(str(k) for k in value if allowed is not None and k not in allowed)
        if unknown:
            raise self.fail(where + (unknown[0],), f"unknown key; the keys here are {', '.join(sorted(allowed))}")
        return value

    def persona(self) -> Persona:
        if not isinstance(self.data, dict):
            raise self.fail((), "expected a mapping of persona keys at the top level "
                                "(see resources/personas/deepred.yaml)")
        self.mapping((), TOP_LEVEL)
        cutoff = self.cutoff()
        centuries = self.texts(("knowledge", "later_centuries"), required=False)
        self.pattern(("knowledge", "later_centuries"), required=False)  # each checked as a regex
        system_prompts = self.system_prompts()
        return Persona(
            name=self.text(("name",)), title=self.text(("title",)), description=self.text(("description",)),
            file=self.path, system_prompts=system_prompts, prompts_path=self.prompts_path(),
            categories=self.texts(("categories",)),
            temporal_category=self.text(("temporal_category",), required=False) or "temporal",
            style_fields=self.style_fields(), persona_anchors=self.texts(("style", "persona_anchors"), minimum=3),
            generic_anchors=self.texts(("style", "generic_anchors"), minimum=3),
            judge_traits=self.text(("style", "judge_traits"), required=False) or "the persona's vocabulary and voice",
            cutoff=cutoff, later_terms=self.pattern(("knowledge", "later_terms")),
            later_years=later_year_pattern(cutoff, centuries), years_after=years_after(cutoff),
            deflections=self.pattern(("knowledge", "deflections"), required=False), targets=self.targets(),
            sample_question=self.text(("sample_question",), required=False),
            heldout_prompts_path=self.heldout_prompts_path(), horizon=self.horizon(cutoff),
            contrast_anchors=tuple(self.texts(("style", "contrast_anchors"), minimum=3, required=False)),
            out_of_character=self.pattern(("out_of_character",), required=False))

    def cutoff(self) -> int:
        """The last year the persona knows, in any era (era.parse_cutoff: 180, 1899, 2300, -44, '44 BC')."""
        self.mapping(("knowledge",), KNOWLEDGE_KEYS)
        try:
            return parse_cutoff(self.get(("knowledge", "cutoff")))
        except ValueError as exc:
            raise self.fail(("knowledge", "cutoff"), str(exc)) from None

    def horizon(self, cutoff: int) -> Horizon | None:
        where = ("knowledge", "horizon")
        if not self.mapping(where, HORIZON_KEYS, required=False):
            return None
        topics, topic_years = self.topics(where + ("topics",), cutoff)
        templates = {"questions": "{topic}", "year_questions": "{year}"}
        lists = {key: self.texts(where + (key,), required=key in ("questions", "replies"))
                 for key in ("questions", "year_questions", "replies")}
        for key, field_ in templates.items():
            for i, text in enumerate(lists[key]):
                if field_ not in text:
                    raise self.fail(where + (key, i), f"a question template needs {field_} where the subject goes")
                self.template(where + (key, i), text, cutoff, f"{field_} and {{cutoff}}", **{field_[1:-1]: "x"})
        for i, text in enumerate(lists["replies"]):
            self.template(where + ("replies", i), text, cutoff, "{subject} and {cutoff}", subject="x")
        years = self.get(where + ("years",), required=False) or []
        if not isinstance(years, list) or any(not _is_year(y) or y <= cutoff for y in years):
            raise self.fail(where + ("years",), f"expected a list of years after the cutoff {year_label(cutoff)} "
                                                f"(BC years negative), got {_shown(years)}")
        dating = self.dating(where + ("dating",), cutoff)
        return Horizon(topics, lists["questions"], years, lists["year_questions"], lists["replies"],
                       self.facts(where + ("facts",), cutoff), topic_years, dating)

    def topics(self, where: tuple, cutoff: int) -> tuple[list[str], dict[str, int]]:
        """Each topic is text, or `text: year` (the year it belongs to, after the cutoff) for dated rows."""
        value = self.get(where)
        if not isinstance(value, list) or not value:
            raise self.fail(where, f"expected a list of at least 1 topic, got {_shown(value)}")
        topics, years = [], {}
        for i, item in enumerate(value):
            if isinstance(item, dict) and len(item) == 1:
                (topic, year), = item.items()
                if not isinstance(topic, str) or not topic.strip() or not _is_year(year) or year <= cutoff:
                    raise self.fail(where + (i,), f"expected `topic: year` with a year after the cutoff "
                                                  f"{year_label(cutoff)}, got {_shown(item)}")
                years[topic.strip()] = year
                item = topic
            elif not isinstance(item, str) or not item.strip():
                raise self.fail(where + (i,), f"expected text or `topic: year`, got {_shown(item)}")
            elif QUOTED_DATED_TOPIC.fullmatch(item.strip()):  # YAML read it as text, so the year would be asked about
                raise self.fail(where + (i,), dated_text_problem(item.strip()))
            topics.append(item.strip())
        return topics, years

    def dating(self, where: tuple, cutoff: int) -> dict[str, str] | None:
        """The sentence that places a subject in time before the reply: `later` before a deflection, `within`
        before a period fact's answer; each may use {subject}, {Subject}, {year} and {cutoff}."""
        if not self.mapping(where, DATING_KEYS, required=False):
            return None
        texts = {key: self.text(where + (key,)) for key in sorted(DATING_KEYS)}
        for key, text in texts.items():
            self.template(where + (key,), text, cutoff, "{subject}, {Subject}, {year} and {cutoff}",
                          subject="x", Subject="X", year=1)
        return texts

    def template(self, where: tuple, text: str, cutoff: int, allowed: str, **fields: Any) -> None:
        try:
            text.format(cutoff=cutoff, **fields)
        except (KeyError, IndexError, ValueError) as exc:
            raise self.fail(where, f"a template may use {allowed} only ({exc!r}); double a literal brace as "
                                   "{{ }}") from None

    def facts(self, where: tuple, cutoff: int) -> list[dict]:
        """{question, answer}, and optionally the {subject, year} (up to the cutoff) that `dating` places in time."""
        facts = self.get(where, required=False) or []
        if not isinstance(facts, list):
            raise self.fail(where, f"expected a list of {{question, answer}} mappings, got {_shown(facts)}")
        for i, fact in enumerate(facts):
            keys = set(fact) - {"expect_any"} if isinstance(fact, dict) else set()
            ok = keys in ({"question", "answer"}, FACT_KEYS) and all(
                isinstance(fact[k], str) and fact[k].strip() for k in keys - {"year"})
            if not ok or ("year" in keys and (not _is_year(fact["year"]) or fact["year"] > cutoff)):
                raise self.fail(where + (i,), f"expected {{question, answer}} or {{question, answer, subject, year}} "
                                              f"with a year up to the cutoff {year_label(cutoff)}, got {_shown(fact)}")
            expect = fact.get("expect_any", [])
            if not isinstance(expect, list) or not all(isinstance(k, str) and k.strip() for k in expect):
                raise self.fail(where + (i, "expect_any"), f"expected a list of words any right answer names, got "
                                                           f"{_shown(expect)}")
        return [{k: v.strip() if isinstance(v, str) else v for k, v in f.items()} for f in facts]

    def system_prompts(self) -> dict[str, str]:
        prompts = self.mapping(("system_prompts",))
        for key in prompts:
            self.text(("system_prompts", key))
        if "evaluation" not in prompts:
            raise self.fail(("system_prompts",), "missing 'evaluation' (the system prompt sent with every "
                                                 "evaluation question); add it")
        return {str(k): v.strip() for k, v in prompts.items()}

    def prompts_path(self) -> Path:
        return self.prompts_file("prompts", "evaluation prompts")

    def heldout_prompts_path(self) -> Path | None:
        if "heldout_prompts" not in self.data:
            return None
        return self.prompts_file("heldout_prompts", "held-out prompts")

    def prompts_file(self, key: str, what: str) -> Path:
        path = (self.path.parent / self.text((key,))).resolve()
        if not path.is_file():
            raise self.fail((key,), f"{what} not found at {path}; the path is relative to the persona file")
        return path

    def style_fields(self) -> dict[str, re.Pattern]:
        self.mapping(("style",), STYLE_KEYS)
        fields = self.mapping(("style", "fields"))
        if not fields:
            raise self.fail(("style", "fields"), "no style fields; add at least one field with its word stems")
        return {str(name): self.pattern(("style", "fields", name)) for name in fields}

    def targets(self) -> Targets:
        given = self.mapping(("targets",), set(Targets.__dataclass_fields__), required=False) or {}
        for key, value in given.items():
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                raise self.fail(("targets", key), f"expected a share between 0 and 1 such as 0.9, got {_shown(value)}")
        return Targets(**{k: float(v) for k, v in given.items()})


def _is_year(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _shown(value: Any) -> str:
    if value is None:
        return "nothing"
    text = repr(value)
    return f"{type(value).__name__} {text[:60]}"
