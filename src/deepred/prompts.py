"""A persona's evaluation prompts, and its held-out ones: JSONL rows {id, category, prompt[, kind, expect_any]}, each
bad line named.

Read by evaluation (the questions it asks), validation (which of them a dataset trains on) and the stages that ask
one question to show a model answers (the persona's sample question).

A row's `kind` says which temporal rule judges it: `post_<cutoff>` (or its era-neutral spelling `post_cutoff`, read
as `post_<cutoff>`: that is how it is compared and reported) for a question about later years, `control` for one
about the world up to the cutoff (answered when one of `expect_any` appears), `unknown` for the anachronism check
alone. Any other kind would switch a rule off without a word, so it is refused with its FILE:LINE.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Callable

from .errors import DeepRedError
from .files import read_regular_file
from .jsonl import numbered_lines, parse_json_object
from .persona import Persona, default_persona


def bundled_prompts_path() -> Path:
    return Path(str(resources.files("deepred") / "resources" / "eval_prompts.jsonl"))


def read_jsonl(path: str | Path, what: str, shape: str = '{"id": ..., "prompt": ...}',
               allow_empty: bool = False, check: Callable[[dict], dict] | None = None) -> list[dict]:
    """Rows of a JSONL file, each passed through `check` where given (it raises a DeepRedError naming FILE:LINE for
    a bad row). A missing file, a folder or FIFO is a one-line DeepRedError; a line that is not UTF-8, not a JSON
    object, or that `check` refuses is named with its number, every bad line at once. `shape` shows what a line
    should look like. An empty file is refused unless `allow_empty`."""
    path = Path(path).expanduser()
    raw = read_regular_file(path, f"pass the {what} .jsonl file")  # a leading BOM removed
    rows, bad = [], []
    for number, line in numbered_lines(raw):
        row, problems = parse_json_object(line, shape)
        if problems:
            bad.append(f"{path}:{number}: {problems[0]}")
            continue
        row["_line"] = number
        try:
            rows.append(check(row) if check else row)
        except DeepRedError as exc:
            bad.append(str(exc))
    refuse_bad_lines(bad, path, what)
    if not rows and not allow_empty:
        raise DeepRedError(f"{path}: no rows; the {what} file is empty")
    return rows


def refuse_bad_lines(problems: list[str], path: str | Path, what: str) -> None:
    """Every bad line of a file at once, one `FILE:LINE: message` a line (a single one as it is)."""
    if len(problems) == 1:
        raise DeepRedError(problems[0])
    if problems:
        raise DeepRedError("\n".join([*problems, f"{path}: {len(problems)} bad lines in the {what} file; fix them "
                                                  "and run again"]))


def load_prompts(path: str | Path | None = None, persona: Persona | None = None) -> list[dict]:
    """Prompt rows {id, category, prompt[, kind, expect_any]} from JSONL; default: the persona's prompts (Deep
    Red's: the bundled 72)."""
    persona = persona or default_persona()
    path = Path(path) if path else persona.prompts_path

    def prompt_row(row: dict) -> dict:
        if not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            raise DeepRedError(f"{path}:{row['_line']}: needs a non-empty \"prompt\" string")
        fields = prompt_fields(row, f"prompt-{row['_line']:03d}", checked_kind(row, persona, path),
                               f"{path}:{row['_line']}")
        if fields.get("kind") == "control" and not fields.get("expect_any"):  # else only anachronisms are looked for
            raise DeepRedError(f"{path}:{row['_line']}: a control question needs \"expect_any\", the words a right "
                               "answer names (e.g. [\"gagarin\"]), or whether it was answered cannot be told")
        return {**fields, "_line": row["_line"]}

    return unique_ids(read_jsonl(path, "prompts", '{"id": ..., "category": ..., "prompt": ...}', check=prompt_row),
                      path)


LATER_KIND = "post_cutoff"  # the era-neutral spelling of post_<cutoff>
PLAIN_KINDS = ("control", "unknown")


def checked_kind(row: dict, persona: Persona, path: str | Path) -> str | None:
    """The row's temporal kind as the evaluator compares it (`post_cutoff` -> post_<cutoff>); a kind that names
    another year, or no kind the evaluator knows, is a one-line DeepRedError naming FILE:LINE."""
    kind = row.get("kind")
    if not kind:
        return None
    later = persona.later_kind
    where = f"{path}:{row.get('_line', '?')}"
    if kind in (LATER_KIND, later) or kind in PLAIN_KINDS:
        return later if kind == LATER_KIND else kind
    if isinstance(kind, str) and kind.startswith("post_"):
        raise DeepRedError(f"{where}: kind {kind!r} names a year other than {persona.title}'s cutoff "
                           f"{persona.cutoff}, so the later-years rule would not judge it; write kind {later} "
                           f"(or {LATER_KIND})")
    raise DeepRedError(f"{where}: unknown kind {kind!r}; write {later} (or {LATER_KIND}) for a question about after "
                       f"the cutoff, control (with expect_any) for one about the world up to it, or leave it out")


def load_heldout_prompts(persona: Persona) -> list[dict]:
    """The persona's held-out prompts (its `heldout_prompts` file), rows checked like load_prompts'."""
    if persona.heldout_prompts_path is None:
        raise DeepRedError(f"{persona.file}: persona '{persona.name}' has no held-out prompts; add "
                           "'heldout_prompts: FILE.jsonl' to it (see README, 'Your own persona')")
    return load_prompts(persona.heldout_prompts_path, persona)


def prompt_fields(row: dict, default_id: str, kind: str | None = None, where: str = "") -> dict:
    """id, category, prompt and, where given, kind (`kind`, already checked, else the row's) and expect_any; a field
    of the wrong type is one line naming `where` (FILE:LINE)."""
    for name in ("category", "prompt"):
        if row.get(name) is not None and not isinstance(row[name], str):
            raise DeepRedError(f"{where}: \"{name}\" must be text, got {type(row[name]).__name__} {row[name]!r}")
    keys = row.get("expect_any")
    if keys is not None and not (isinstance(keys, list) and all(isinstance(k, str) and k.strip() for k in keys)):
        raise DeepRedError(f"{where}: \"expect_any\" must be a list of words a right answer names, e.g. "
                           f"[\"gagarin\"], got {keys!r}")
    prompt = {"id": str(row.get("id") or default_id), "category": row.get("category"),
              "prompt": row.get("prompt") or ""}
    if kind or row.get("kind"):
        prompt["kind"] = kind or row["kind"]
    if row.get("expect_any"):
        prompt["expect_any"] = row["expect_any"]
    return prompt


def unique_ids(rows: list[dict], path: Path) -> list[dict]:
    """The rows without their `_line`, once each id is seen to be used once (a second one is named with both
    lines)."""
    seen: dict[str, dict] = {}
    for row in rows:
        if row["id"] in seen:
            first, again = seen[row["id"]].get("_line"), row.get("_line")
            where = f"{path}:{again}" if again else str(path)
            also = f" (first on line {first})" if first else ""
            raise DeepRedError(f"{where}: id '{row['id']}' appears twice{also}; ids must be unique")
        seen[row["id"]] = row
    return [{key: value for key, value in row.items() if key != "_line"} for row in rows]


def sample_question(persona: Persona) -> str:
    """The one question asked to show a model answers as the persona: its `sample_question`, else its first prompt."""
    return persona.sample_question or load_prompts(None, persona)[0]["prompt"]


def sample_chat(persona: Persona) -> list[dict]:
    """The sample question with the persona's evaluation system prompt, as chat messages."""
    return [{"role": "system", "content": persona.evaluation_system_prompt},
            {"role": "user", "content": sample_question(persona)}]


def prompt_key(text: str) -> str:
    """A question as compared for overlap: lower case, letters and digits only, single spaces."""
    return " ".join("".join(c if c.isalnum() else " " for c in text.lower()).split())


def protected_prompts(persona: Persona) -> set[str]:
    """prompt_key of every evaluation prompt of the persona (its prompts and, where it has one, its held-out set):
    nothing generated for training may ask one of them."""
    rows = load_prompts(None, persona)
    if persona.heldout_prompts_path:
        rows += load_heldout_prompts(persona)
    return {prompt_key(row["prompt"]) for row in rows}


def refuse_evaluation_prompts(pairs: list[dict], persona: Persona, source: object) -> None:
    """A preference pair that asks one of the persona's evaluation or held-out prompts would train on the test:
    refused in one line naming SOURCE:LINE."""
    protected = protected_prompts(persona)
    for pair in pairs:
        question = pair["prompt"][-1]["content"]
        if prompt_key(question) in protected:
            raise DeepRedError(f"{source}:{pair.get('line', '?')}: the question {question!r} is one of the persona's "
                               "evaluation prompts; training on it would score the model on what it memorised. Remove "
                               "it from the pairs")
