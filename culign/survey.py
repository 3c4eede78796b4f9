"""The VSM 2013 instrument as data: items, wordings, templates, presentations, the train / validation / held-out
split, the index formulas and the L1 loss.

Knows nothing of torch or HTTP. Everything is a data file under ``culign/data`` so a user can add a wording or swap
in another instrument of the same shape:

- ``vsm2013.json``: the 24 items in the official wording (stem, text, five labels), the index formulas.
- ``wordings/*.json``: other complete wordings of the same 24 items (same meaning, same answer direction).
- ``templates.json``: how an item is put to a chat model (system line, user turn, option format, prefill).

A *presentation* is wording x template x order, named ``wording/template/order`` (``vsm/chat/asc``). ``asc`` lists
digit k as answer k; ``desc`` renumbers the scale (digit k means answer 6-k) and is mapped back when scoring.
Each presentation belongs to three *families* (``wording:vsm``, ``template:chat``, ``order:asc``); the default
split holds whole families out of training, so a held-out score measures a wording or a template the optimiser
never saw in any combination.

VSM 2013 questionnaire: copyright Geert Hofstede BV, offered free for academic research (see NOTICE).
"""
from __future__ import annotations

import fnmatch
import itertools
import json
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Iterable, Mapping, Sequence

DIMENSIONS = ("PDI", "IDV", "MAS", "UAI", "LTO", "IVR")
ANSWERS = (1, 2, 3, 4, 5)
ORDERS = ("asc", "desc")
# How an answer is read from the model (a template says which it is written for):
#   digit  the next token after the prefill, among the five option symbols (1..5, or A..E for a letters template)
#   label  each option's label text scored as the continuation of the prefill (sum of its token log-probabilities)
READOUTS = ("digit", "label")
SYMBOLS = {"digits": ("1", "2", "3", "4", "5"), "letters": ("A", "B", "C", "D", "E")}
OFFICIAL_WORDING = "vsm"

# Default index constant C for every dimension: a respondent answering the same everywhere (e.g. the midpoint)
# has all item differences 0 and scores exactly C, so 50 puts "no preference" in the middle of Hofstede's 0..100.
DEFAULT_CONSTANT = 50.0

# The names culign used before wordings and templates were data (adapters and reports made then still say them).
LEGACY_NAMES = {"standard": "vsm/chat/asc", "reversed": "vsm/chat/desc", "inline": "vsm/inline/asc"}
TEMPLATE_FIELDS = ("system", "user_template", "option_format", "option_joiner", "prefill")


class SurveyDataError(ValueError):
    """A wording, template or instrument file that does not hold what culign needs; the message names the file
    and the item or field."""


def _where(source: str, item_id: int | None = None, line: int | None = None, path: str | None = None) -> str:
    return (source + (f", item {item_id}" if item_id is not None else "") + (f" (line {line})" if line else "")
            + (f" at {path}" if path else ""))


def _line_of(text: str, item_id: int) -> int | None:
    """The line where item ``item_id`` starts in a JSON file, for error messages (best effort)."""
    m = re.search(rf'"id"\s*:\s*{item_id}(?![0-9.eE])', text)
    return text.count("\n", 0, m.start()) + 1 if m else None


def _entry_lines(text: str, key: str = "items") -> list[int]:
    """The line on which each entry of the top-level list ``key`` starts (best effort: [] if not found).

    Walks the list with the JSON decoder itself, so the lines are exact whatever the layout.
    """
    decoder = json.JSONDecoder()
    m = re.search(rf'"{key}"\s*:\s*\[', text)
    lines: list[int] = []
    if not m:
        return lines
    pos = m.end()
    try:
        while True:
            while pos < len(text) and text[pos] in " \t\r\n,":
                pos += 1
            if pos >= len(text) or text[pos] == "]":
                return lines
            lines.append(text.count("\n", 0, pos) + 1)
            _, pos = decoder.raw_decode(text, pos)
    except ValueError:
        return lines


_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")  # tabs and newlines are fine in survey text


def _show(value, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _read_json(source: str, text: str) -> dict:
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as e:
        raise SurveyDataError(f"{source}: not valid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    if not isinstance(raw, dict):
        raise SurveyDataError(f"{source}: expected a JSON object at the top level")
    return raw


# ---------------------------------------------------------------------------------------------------- items
@dataclass(frozen=True)
class Item:
    id: int
    stem: str | None
    text: str
    scale: Mapping[int, str]  # answer value 1..5 -> label
    section: str = ""

    @property
    def question(self) -> str:
        return f"{self.stem}\n{self.text}" if self.stem else self.text


def _parse_items(raw_items, ids: Sequence[int] | None, source: str, text: str) -> dict[int, Item]:
    """Items from a file's ``items`` list; every id of ``ids`` exactly once (when given), five labels each."""
    if not isinstance(raw_items, list):
        raise SurveyDataError(f"{source}: 'items' must be a list of items")
    items: dict[int, Item] = {}
    lines = _entry_lines(text)
    for n, it in enumerate(raw_items):
        line = lines[n] if n < len(lines) else None
        if not isinstance(it, dict) or not isinstance(it.get("id"), int) or isinstance(it.get("id"), bool):
            got = it.get("id") if isinstance(it, dict) else it
            raise SurveyDataError(f"{_where(source, None, line, f'items[{n}]')}: entry {n + 1} of 'items' needs an "
                                  f"integer 'id', got {_show(got)}")
        item_id = it["id"]
        where = _where(source, item_id, line or _line_of(text, item_id), f"items[{n}]")
        if item_id in items:
            raise SurveyDataError(f"{where}: the id appears twice")
        if ids is not None and item_id not in ids:
            raise SurveyDataError(f"{where}: the instrument has no item {item_id} (its ids are {min(ids)}..{max(ids)})")
        stem, body, scale = it.get("stem"), it.get("text"), it.get("scale")
        if stem is not None and (not isinstance(stem, str) or not stem.strip()):
            raise SurveyDataError(f"{where}: 'stem' must be a non-empty string or null")
        if not isinstance(body, str) or not body.strip():
            raise SurveyDataError(f"{where}: 'text' must be a non-empty string")
        if isinstance(scale, list):
            scale = {str(k): v for k, v in zip(ANSWERS, scale)} if len(scale) == 5 else scale
        if not isinstance(scale, dict) or sorted(scale) != [str(a) for a in ANSWERS]:
            got = sorted(scale) if isinstance(scale, dict) else scale
            raise SurveyDataError(f"{where}: 'scale' must give five labels, for answers 1..5; got {got!r}")
        for k, label in scale.items():
            if not isinstance(label, str):
                raise SurveyDataError(f"{where}: the label for answer {k} must be a string, got {_show(label)}")
            if not label.strip():
                raise SurveyDataError(f"{where}: the label for answer {k} is empty")
        for key, value in (("stem", stem), ("text", body), *((f"label {k}", v) for k, v in scale.items())):
            if isinstance(value, str) and _CONTROL.search(value):
                raise SurveyDataError(f"{where}: {key} contains a control character "
                                      f"{_show(_CONTROL.search(value).group())} (NUL, escape, ...)")
        if not isinstance(it.get("section", ""), str):
            raise SurveyDataError(f"{where}: 'section' must be a string, got {_show(it.get('section'))}")
        items[item_id] = Item(item_id, stem, body, {int(k): v for k, v in scale.items()}, it.get("section", ""))
    if ids is not None:
        missing = [i for i in ids if i not in items]
        if missing:
            raise SurveyDataError(f"{source}: item(s) {', '.join(map(str, missing))} missing: a wording must give "
                                  f"all {len(ids)} items")
    return items


# ---------------------------------------------------------------------------------------------------- wordings
@dataclass(frozen=True)
class Wording:
    """One complete phrasing of every item: stems, texts and the five labels of each scale."""
    name: str
    title: str
    note: str
    items: Mapping[int, Item]
    source: str = ""

    @classmethod
    def from_text(cls, text: str, source: str, ids: Sequence[int]) -> "Wording":
        raw = _read_json(source, text)
        for key in ("title", "note"):
            if key in raw and not isinstance(raw[key], str):
                raise SurveyDataError(f"{source}: '{key}' must be a string, got {_show(raw[key])}")
        name = raw.get("name")
        if not isinstance(name, str) or not name or not name.replace("-", "").replace("_", "").isalnum():
            raise SurveyDataError(f"{source}: 'name' must be a word of letters, digits, '-' or '_' (it is part of "
                                  f"presentation names like NAME/chat/asc), got {name!r}")
        return cls(name, str(raw.get("title", name)), str(raw.get("note", "")),
                   _parse_items(raw.get("items"), ids, source, text), source)

    @classmethod
    def load(cls, path: str | Path, ids: Sequence[int]) -> "Wording":
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as e:
            raise SurveyDataError(f"{path}: cannot read the wording file: {e}") from None
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            line = data.count(b"\n", 0, e.start) + 1
            raise SurveyDataError(f"{path}: line {line}: not UTF-8 (byte {data[e.start]:#04x} at offset {e.start}); "
                                  "save the wording file as UTF-8") from None
        return cls.from_text(text, str(path), ids)


# ---------------------------------------------------------------------------------------------------- templates
@dataclass(frozen=True)
class Template:
    name: str
    system: str
    user_template: str  # fields {stem}, {text}, {options}; items that share a stem and scale share a token prefix
    option_format: str  # fields {digit}, {label}
    option_joiner: str
    prefill: str  # assistant text right before the answer digit ("Answer: " puts ~95 % of p on the digits)
    note: str = ""
    readout: str = "digit"  # "digit": options carry symbols, the next token is read; "label": options listed
    # without symbols, each label scored as the continuation of the prefill
    symbols: str = "digits"  # digit read-out only: "digits" (1..5) or "letters" (A..E), what {digit} renders

    @property
    def option_symbols(self) -> tuple[str, ...]:
        return SYMBOLS[self.symbols]

    @classmethod
    def from_dict(cls, raw, source: str) -> "Template":
        if not isinstance(raw, dict) or not isinstance(raw.get("name"), str) or not raw["name"].isidentifier():
            raise SurveyDataError(f"{source}: every template needs a 'name' (letters, digits, '_')")
        where = f"{source}, template {raw['name']!r}"
        for key in TEMPLATE_FIELDS:
            if not isinstance(raw.get(key), str):
                raise SurveyDataError(f"{where}: field {key!r} is missing or not a string")
        readout, symbols = raw.get("readout", "digit"), raw.get("symbols", "digits")
        if readout not in READOUTS:
            raise SurveyDataError(f"{where}: 'readout' must be one of {', '.join(READOUTS)}, got {_show(readout)}")
        if symbols not in SYMBOLS:
            raise SurveyDataError(f"{where}: 'symbols' must be one of {', '.join(SYMBOLS)}, got {_show(symbols)}")
        option_fields = ("{digit}", "{label}") if readout == "digit" else ("{label}",)
        for key, needed in (("user_template", ("{text}", "{options}")), ("option_format", option_fields)):
            for f in needed:
                if f not in raw[key]:
                    raise SurveyDataError(f"{where}: {key} must contain {f}")
        if readout == "label" and "{digit}" in raw["option_format"]:
            raise SurveyDataError(f"{where}: a label read-out template lists its options without symbols: "
                                  "option_format must not contain {digit}")
        try:
            raw["user_template"].format(stem="", text="", options="")
            raw["option_format"].format(digit=1, label="")
        except (KeyError, IndexError, ValueError) as e:
            raise SurveyDataError(f"{where}: a template field uses an unknown placeholder or stray brace: {e}") from None
        return cls(raw["name"], *(raw[k] for k in TEMPLATE_FIELDS), note=str(raw.get("note", "")), readout=readout,
                   symbols=symbols)


# ---------------------------------------------------------------------------------------------------- presentations
@dataclass(frozen=True)
class Presentation:
    """How the survey is put to a model: one wording, one template, one scale order."""
    wording: Wording
    template: Template
    order: str = "asc"

    @property
    def name(self) -> str:
        return f"{self.wording.name}/{self.template.name}/{self.order}"

    @property
    def families(self) -> tuple[str, str, str]:
        return (f"wording:{self.wording.name}", f"template:{self.template.name}", f"order:{self.order}")

    @property
    def reverse(self) -> bool:
        return self.order == "desc"

    @property
    def prefill(self) -> str:
        return self.template.prefill

    @property
    def readout(self) -> str:
        return self.template.readout

    def digit_to_answer(self, digit: int) -> int:
        return 6 - digit if self.reverse else digit

    def continuation(self, item_id: int, answer: int) -> str:
        """Label read-out: the text scored after the prefill for ``answer`` (its label; a space first when the
        prefill ends in a word, so the label's first word is tokenised as it is in running text)."""
        label = self.item(item_id).scale[answer]
        return label if not self.prefill or self.prefill[-1].isspace() else " " + label

    def item(self, item_id: int) -> Item:
        return self.wording.items[item_id]

    def options(self, item_id: int) -> str:
        item = self.item(item_id)
        t = self.template
        symbols = t.option_symbols
        return t.option_joiner.join(t.option_format.format(digit=symbols[d - 1],
                                                           label=item.scale[self.digit_to_answer(d)])
                                    for d in ANSWERS)

    def messages(self, item_id: int, persona: str | None = None) -> list[dict[str, str]]:
        item, t = self.item(item_id), self.template
        system = t.system if persona is None else f"{persona_line(persona)} {t.system}"
        # an absent stem leaves an empty first line, which strip() removes (templates put {stem} first or on its own)
        user = t.user_template.format(stem=item.stem or "", options=self.options(item_id), text=item.text).strip()
        return [{"role": "system", "content": system}, {"role": "user", "content": user}]


def persona_line(country: str) -> str:
    """The in-context (persona) baseline of the precursor study ('Act like you are someone from <country>')."""
    return f"Answer as a typical person from {country} would."


# ---------------------------------------------------------------------------------------------------- split
@dataclass(frozen=True)
class Split:
    """Which presentations train, which select (validation) and which only measure (held-out), by family."""
    train: tuple[str, ...]
    validation: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    heldout: Mapping[str, tuple[str, ...]] = field(default_factory=dict)

    @property
    def validation_names(self) -> list[str]:
        return _unique(itertools.chain.from_iterable(self.validation.values()))

    @property
    def heldout_names(self) -> list[str]:
        return _unique(itertools.chain.from_iterable(self.heldout.values()))

    @property
    def all_names(self) -> list[str]:
        return _unique([*self.train, *self.validation_names, *self.heldout_names])

    def leaks(self) -> list[str]:
        """Every way a validation or held-out presentation shares something with training; [] for a sound split.

        A family named after a wording, template or order (``wording:formal``) must not have that wording, template
        or order in any training presentation; any other family must at least share no presentation with training,
        and validation and held-out share no presentation either.
        """
        problems = []
        train = set(self.train)
        train_parts = [set(n.split("/")[i] for n in self.train) for i in range(3)]
        for role, families in (("validation", self.validation), ("held-out", self.heldout)):
            for family, names in families.items():
                if overlap := train & set(names):
                    problems.append(f"{role} family {family} contains training presentation(s) {sorted(overlap)}")
                kind, _, value = family.partition(":")
                if kind in ("wording", "template", "order"):
                    part = ("wording", "template", "order").index(kind)
                    if value in train_parts[part]:
                        problems.append(f"{role} family {family}: {kind} {value!r} appears in training")
                    if any(n.split("/")[part] != value for n in names):
                        problems.append(f"{role} family {family} holds presentations of another {kind}")
        if overlap := set(self.validation_names) & set(self.heldout_names):
            problems.append(f"presentations both validation and held-out: {sorted(overlap)}")
        return problems

    def to_dict(self) -> dict:
        return {"train": list(self.train), "validation": {k: list(v) for k, v in self.validation.items()},
                "heldout": {k: list(v) for k, v in self.heldout.items()}}

    @classmethod
    def from_dict(cls, raw: dict) -> "Split":
        """The inverse of :meth:`to_dict` (an adapter's provenance, a report)."""
        return cls(tuple(raw["train"]), {k: tuple(v) for k, v in raw.get("validation", {}).items()},
                   {k: tuple(v) for k, v in raw.get("heldout", {}).items()})


def _unique(names: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(names))


def _names(wordings: Sequence[str], templates: Sequence[str], orders: Sequence[str]) -> tuple[str, ...]:
    return tuple(f"{w}/{t}/{o}" for w, t, o in itertools.product(wordings, templates, orders))


# The default split: 3 wordings x 3 templates in ascending order train (9 presentations). Validation has a wording
# and a template of its own; held-out has another wording, another template, the reversed order, and all three
# new at once. Nothing in validation or held-out shares a wording, template or order with training unless the
# family's name says which one is new. Chosen before any result was seen and never tuned to a held-out score.
TRAIN_WORDINGS, TRAIN_TEMPLATES = ("vsm", "plain", "terse"), ("chat", "inline", "form")
DEFAULT_SPLIT = Split(
    train=_names(TRAIN_WORDINGS, TRAIN_TEMPLATES, ["asc"]),
    validation={"wording:casual": _names(["casual"], TRAIN_TEMPLATES, ["asc"]),
                "template:quiz": _names(TRAIN_WORDINGS, ["quiz"], ["asc"])},
    heldout={"wording:formal": _names(["formal"], TRAIN_TEMPLATES, ["asc"]),
             "template:interview": _names(TRAIN_WORDINGS, ["interview"], ["asc"]),
             "order:desc": _names(TRAIN_WORDINGS, TRAIN_TEMPLATES, ["desc"]),
             "unseen:all": _names(["formal"], ["interview"], ["desc"])},
)


# The same split for the label read-out, on its own templates (the digit ones' counterparts, options without symbols).
LABEL_TRAIN_TEMPLATES = ("label_chat", "label_inline", "label_form")
DEFAULT_LABEL_SPLIT = Split(
    train=_names(TRAIN_WORDINGS, LABEL_TRAIN_TEMPLATES, ["asc"]),
    validation={"wording:casual": _names(["casual"], LABEL_TRAIN_TEMPLATES, ["asc"]),
                "template:label_quiz": _names(TRAIN_WORDINGS, ["label_quiz"], ["asc"])},
    heldout={"wording:formal": _names(["formal"], LABEL_TRAIN_TEMPLATES, ["asc"]),
             "template:label_interview": _names(TRAIN_WORDINGS, ["label_interview"], ["asc"]),
             "order:desc": _names(TRAIN_WORDINGS, LABEL_TRAIN_TEMPLATES, ["desc"]),
             "unseen:all": _names(["formal"], ["label_interview"], ["desc"])},
)
DEFAULT_SPLITS = {"digit": DEFAULT_SPLIT, "label": DEFAULT_LABEL_SPLIT}


def _twin(name: str) -> str:
    w, t, o = name.split("/")
    return f"{w}/{t}/{'desc' if o == 'asc' else 'asc'}"


def both_orders(split: Split) -> Split:
    """The split with every presentation in both scale orders: training sees ascending and reversed listings, so
    a prompt cannot gain by moving a digit's position. A held-out family named after an order (``order:desc``) has
    nothing left to hold out and goes; every other family gets its presentations' twins, so held-out wordings and
    templates stay disjoint from training (``leaks()`` stays empty for a sound split)."""
    both = lambda names: _unique(n for name in names for n in (name, _twin(name)))  # noqa: E731
    train = tuple(both(split.train))
    families = []
    for fams in (split.validation, split.heldout):
        kept = {}
        for fam, names in fams.items():
            if fam.startswith("order:"):
                continue
            twins = tuple(n for n in both(names) if n not in train)
            if twins:
                kept[fam] = twins
        families.append(kept)
    return Split(train, families[0], families[1])


# ---------------------------------------------------------------------------------------------------- the survey
@dataclass(frozen=True)
class Survey:
    name: str
    items: tuple[Item, ...]  # the official wording, in instrument order
    formulas: Mapping[str, tuple[tuple[float, int, int], ...]]  # dim -> ((coef, i, j), ...): coef*(m_i - m_j)
    wordings: Mapping[str, Wording]
    templates: Mapping[str, Template]
    license_note: str = ""

    @property
    def item_ids(self) -> list[int]:
        return [it.id for it in self.items]

    @classmethod
    def load(cls, path: str | Path | None = None, wording_files: Sequence[str | Path] = ()) -> "Survey":
        """The instrument with every wording and template shipped with culign, plus ``wording_files`` of the user's.

        Everything is validated here: a bad file raises SurveyDataError naming the file and the item or field.
        """
        data = resources.files("culign.data")
        if path is None:
            source, text = "culign/data/vsm2013.json", data.joinpath("vsm2013.json").read_text(encoding="utf-8")
        else:
            source, text = str(path), Path(path).read_text(encoding="utf-8")
        raw = _read_json(source, text)
        official = _parse_items(raw.get("items"), None, source, text)
        if not official:
            raise SurveyDataError(f"{source}: the instrument has no items")
        ids = list(official)
        formulas = {}
        for dim, f in (raw.get("formulas") or {}).items():
            try:
                formulas[dim] = tuple((float(c), int(i), int(j)) for c, i, j in f["terms"])
            except (KeyError, TypeError, ValueError):
                raise SurveyDataError(f"{source}: formula {dim} must have 'terms' as [coef, i, j] lists") from None
            for _, i, j in formulas[dim]:
                if i not in official or j not in official:
                    raise SurveyDataError(f"{source}: formula {dim} refers to item {i} or {j}, not in the survey")
        wordings = {OFFICIAL_WORDING: Wording(OFFICIAL_WORDING, "VSM 2013 (official)", "the official VSM 2013 wording",
                                              official, source)}
        shipped = sorted((p for p in data.joinpath("wordings").iterdir() if p.name.endswith(".json")),
                         key=lambda p: p.name)
        for p in shipped:
            wordings_add(wordings, Wording.from_text(p.read_text(encoding="utf-8"), f"culign/data/wordings/{p.name}",
                                                     ids))
        for p in wording_files:
            wordings_add(wordings, Wording.load(p, ids))
        traw = _read_json("culign/data/templates.json", data.joinpath("templates.json").read_text(encoding="utf-8"))
        templates = {}
        for t in traw.get("templates", []):
            tpl = Template.from_dict(t, "culign/data/templates.json")
            templates[tpl.name] = tpl
        return cls(raw.get("name", "survey"), tuple(official[i] for i in ids), formulas, wordings, templates,
                   raw.get("license_note", ""))

    # ------------------------------------------------------------------ presentations
    def presentation(self, name: str) -> Presentation:
        """``wording/template/order`` (order defaults to asc) or a legacy name (standard, reversed, inline)."""
        full = LEGACY_NAMES.get(name, name)
        parts = full.split("/")
        if len(parts) == 2:
            parts.append("asc")
        if len(parts) != 3:
            raise ValueError(f"unknown presentation {name!r}: expected WORDING/TEMPLATE/ORDER, e.g. vsm/chat/asc "
                             "(`culign presentations` lists them)")
        w, t, o = parts
        for kind, value, known in (("wording", w, self.wordings), ("template", t, self.templates),
                                   ("order", o, ORDERS)):
            if value not in known:
                raise ValueError(f"unknown {kind} {value!r} in presentation {name!r}; {kind}s: {', '.join(known)}")
        return Presentation(self.wordings[w], self.templates[t], o)

    def presentation_names(self, readout: str | None = None) -> list[str]:
        """Every presentation, or those whose template is written for ``readout``."""
        templates = [n for n, t in self.templates.items() if readout is None or t.readout == readout]
        return list(_names(list(self.wordings), templates, ORDERS))

    def readout_of(self, name: str) -> str:
        return self.presentation(name).readout

    def expand(self, patterns: Iterable[str], readout: str | None = None) -> list[str]:
        """Presentation names from names or shell patterns (``vsm/*/asc``, ``*/interview/*``), validated. With
        ``readout``, patterns match only that read-out's templates, and a name of another read-out is an error."""
        names = []
        for pattern in patterns:
            if any(c in pattern for c in "*?["):
                hits = fnmatch.filter(self.presentation_names(readout), pattern)
                if not hits:
                    raise ValueError(f"presentation pattern {pattern!r} matches nothing"
                                     + (f" for the {readout} read-out" if readout else ""))
                names.extend(hits)
            else:
                name = self.presentation(pattern).name
                if readout is not None and self.readout_of(name) != readout:
                    raise ValueError(f"presentation {name!r} is written for the {self.readout_of(name)} read-out, "
                                     f"not {readout} (`culign presentations` lists each template's read-out)")
                names.append(name)
        return _unique(names)

    def split(self, train: Sequence[str] = (), heldout: Sequence[str] = (), validation: Sequence[str] | None = None,
              readout: str = "digit") -> Split:
        """The default split of ``readout``, with training / held-out / validation presentations overridden where
        given (patterns match that read-out's templates only).

        An override given as one pattern or name becomes one family named after it. Raises ValueError for a split
        that trains on something it holds out.
        """
        if readout not in DEFAULT_SPLITS:
            raise ValueError(f"unknown read-out {readout!r}; choose from {', '.join(READOUTS)}")
        base = DEFAULT_SPLITS[readout]
        expand = lambda patterns: self.expand(patterns, readout)  # noqa: E731
        tr = tuple(expand(train)) if train else base.train
        ho = {p: tuple(expand([p])) for p in heldout} if heldout else dict(base.heldout)
        if validation is None:
            va = dict(base.validation)
        else:
            va = {p: tuple(expand([p])) for p in validation}
        if train and not heldout:  # default held-out families minus whatever the user now trains on
            ho = {k: tuple(n for n in v if n not in tr) for k, v in ho.items()}
            ho = {k: v for k, v in ho.items() if v}
        if train and validation is None:
            va = {k: tuple(n for n in v if n not in tr) for k, v in va.items()}
            va = {k: v for k, v in va.items() if v}
        split = Split(tr, va, ho)
        hard = [p for p in split.leaks() if "contains training" in p or "both validation" in p]
        if hard:
            raise ValueError("; ".join(hard))
        return split

    # ------------------------------------------------------------------ indices
    def indices(self, item_means: Mapping[int, float], constants: Mapping[str, float] | float = DEFAULT_CONSTANT
                ) -> dict[str, float]:
        """Six indices from mean answers per item id (1..5 scale), e.g. PDI = 35(m07-m02) + 25(m20-m23) + C."""
        out = {}
        for dim, terms in self.formulas.items():
            c = constants if isinstance(constants, (int, float)) else constants.get(dim, DEFAULT_CONSTANT)
            out[dim] = float(sum(coef * (item_means[i] - item_means[j]) for coef, i, j in terms) + c)
        return out


def wordings_add(wordings: dict[str, Wording], w: Wording) -> None:
    if w.name in wordings:
        raise SurveyDataError(f"{w.source}: a wording named {w.name!r} exists already ({wordings[w.name].source})")
    wordings[w.name] = w


def l1_loss(indices: Mapping[str, float], target: Mapping[str, float]) -> float:
    """Mean absolute error over the dimensions the target has (a partial target scores only what it has).

    The one definition of culign's loss; everything that reports a loss computes it here.
    """
    dims = [d for d in target if target[d] is not None]
    if not dims:
        raise ValueError("target has no dimensions to compare against")
    return sum(abs(indices[d] - target[d]) for d in dims) / len(dims)
