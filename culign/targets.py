"""Hofstede target scores: the published six-dimension table, region lookup (code, ISO-2 alias, name), custom targets.

Knows nothing of models. Data: Hofstede's dimension data matrix (geerthofstede.com, 2015-08-16), shipped as
``culign/data/hofstede_6d_2015-08-16.csv`` (see NOTICE).
"""
from __future__ import annotations

import csv
import difflib
import io
import json
import math
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from .survey import DIMENSIONS

# ISO 3166 alpha-2 aliases for the table's country rows (cluster rows such as ARA or AFE have none).
ISO2 = {
    "ALB": "AL", "ALG": "DZ", "AND": "AD", "ARG": "AR", "ARM": "AM", "AUL": "AU", "AUT": "AT", "AZE": "AZ",
    "BAN": "BD", "BLR": "BY", "BEL": "BE", "BOS": "BA", "BRA": "BR", "BUL": "BG", "BUF": "BF", "CAN": "CA",
    "CHL": "CL", "CHI": "CN", "COL": "CO", "COS": "CR", "CRO": "HR", "CYP": "CY", "CZE": "CZ", "DEN": "DK",
    "DOM": "DO", "ECA": "EC", "EGY": "EG", "ETH": "ET", "SAL": "SV", "EST": "EE", "FIN": "FI", "FRA": "FR",
    "GEO": "GE", "GER": "DE", "GHA": "GH", "GBR": "GB", "GRE": "GR", "GUA": "GT", "HOK": "HK", "HUN": "HU",
    "ICE": "IS", "IND": "IN", "IDO": "ID", "IRA": "IR", "IRQ": "IQ", "IRE": "IE", "ISR": "IL", "ITA": "IT",
    "JAM": "JM", "JPN": "JP", "JOR": "JO", "KOR": "KR", "KYR": "KG", "LAT": "LV", "LIT": "LT", "LUX": "LU",
    "MAC": "MK", "MAL": "MY", "MLI": "ML", "MLT": "MT", "MEX": "MX", "MOL": "MD", "MNG": "ME", "MOR": "MA",
    "NET": "NL", "NZL": "NZ", "NIG": "NG", "NOR": "NO", "PAK": "PK", "PAN": "PA", "PER": "PE", "PHI": "PH",
    "POL": "PL", "POR": "PT", "PUE": "PR", "ROM": "RO", "RUS": "RU", "RWA": "RW", "SAU": "SA", "SER": "RS",
    "SIN": "SG", "SLK": "SK", "SLV": "SI", "SAF": "ZA", "SPA": "ES", "SUR": "SR", "SWE": "SE", "SWI": "CH",
    "TAI": "TW", "TAN": "TZ", "THA": "TH", "TRI": "TT", "TUR": "TR", "USA": "US", "UGA": "UG", "UKR": "UA",
    "URU": "UY", "VEN": "VE", "VIE": "VN", "ZAM": "ZM", "ZIM": "ZW",
}
EXTRA_NAMES = {"USA": ("United States", "United States of America", "America"), "GBR": ("United Kingdom", "UK"),
               "KOR": ("South Korea", "Korea"), "CZE": ("Czech Republic", "Czechia"), "SLK": ("Slovakia",)}

PERSONA_NAMES = {"USA": "the United States", "GBR": "Great Britain", "KOR": "South Korea", "CZE": "the Czech Republic",
                 "NET": "the Netherlands", "PHI": "the Philippines", "DOM": "the Dominican Republic"}

# Saudi Arabia's matrix row has only LTO and IVR; the paper's region needs all six, so we document two full rows.
SAUDI_VARIANTS = {
    # legacy Hofstede Insights country page (PDI/IDV/MAS/UAI estimates) + matrix LTO/IVR
    "legacy": {"PDI": 95, "IDV": 25, "MAS": 60, "UAI": 80, "LTO": 36, "IVR": 52},
    # Almutairi, Heller & Yen (2020), a VSM 2013 study of Saudi respondents (cited by Masoud et al.)
    "almutairi2020": {"PDI": 72, "IDV": 48, "MAS": 43, "UAI": 64, "LTO": 27, "IVR": 14},
}
DEFAULT_SAUDI_VARIANT = "legacy"


class UnknownRegionError(ValueError):
    def __init__(self, query: str, suggestions: list[str]):
        self.query, self.suggestions = query, suggestions
        hint = f" Did you mean: {', '.join(suggestions)}?" if suggestions else ""
        super().__init__(f"unknown region {query!r}.{hint} (`culign regions` lists them all)")


@dataclass(frozen=True)
class Target:
    key: str  # registry name: ISO-2 alias where there is one, else Hofstede's code (ARA) or a custom name
    name: str
    scores: dict[str, float]  # only the dimensions that have a score
    source: str
    code: str | None = None  # Hofstede code
    missing: tuple[str, ...] = field(default=())

    @property
    def display_name(self) -> str:
        """Name used in the persona line ("U.S.A." in the table reads better as "the United States")."""
        return PERSONA_NAMES.get(self.code or "", self.name)

    def to_dict(self) -> dict:
        return {"key": self.key, "name": self.name, "code": self.code, "scores": self.scores,
                "missing": list(self.missing), "source": self.source}


def _table() -> list[Target]:
    text = resources.files("culign.data").joinpath("hofstede_6d_2015-08-16.csv").read_text(encoding="utf-8")
    rows = []
    cols = {"pdi": "PDI", "idv": "IDV", "mas": "MAS", "uai": "UAI", "ltowvs": "LTO", "ivr": "IVR"}
    for r in csv.DictReader(io.StringIO(text), delimiter=";"):
        scores = {dim: float(r[c]) for c, dim in cols.items() if r[c].strip() not in ("", "#NULL!")}
        missing = tuple(d for d in DIMENSIONS if d not in scores)
        code = r["ctr"].strip()
        rows.append(Target(ISO2.get(code, code), r["country"].strip(), scores,
                           "Hofstede 6-D matrix 2015-08-16", code, missing))
    return rows


TABLE: tuple[Target, ...] = tuple(_table())


def _names(t: Target) -> list[str]:
    return [t.key, t.code or "", t.name, *EXTRA_NAMES.get(t.code or "", ())]


def resolve(query: str, *, saudi_variant: str = DEFAULT_SAUDI_VARIANT) -> Target:
    """Find a region by Hofstede code (USA), ISO-2 alias (US) or name (united states), case-insensitively."""
    q = query.strip().lower()
    for t in TABLE:
        if q in (n.lower() for n in _names(t) if n):
            if t.code == "SAU":
                if saudi_variant not in SAUDI_VARIANTS:
                    raise ValueError(f"unknown Saudi Arabia variant {saudi_variant!r}; "
                                     f"choose from {', '.join(SAUDI_VARIANTS)}")
                return Target(t.key, t.name, dict(SAUDI_VARIANTS[saudi_variant]),
                              f"Saudi Arabia, variant {saudi_variant} (matrix row has only LTO, IVR)", t.code)
            return t
    candidates = {n.lower(): t for t in TABLE for n in _names(t) if n}
    close = difflib.get_close_matches(q, list(candidates), n=5, cutoff=0.6)
    seen, suggestions = set(), []
    for c in close:
        t = candidates[c]
        if t.key not in seen:
            seen.add(t.key)
            suggestions.append(f"{t.key} ({t.name})")
    raise UnknownRegionError(query, suggestions)


_CUSTOM = re.compile(r"^\s*([A-Za-z]{3})\s*=\s*(-?\d+(?:\.\d+)?)\s*$")


TARGET_FILE_MAX_BYTES = 64 * 1024  # a target is six numbers; anything larger is the wrong file


class TargetFileError(ValueError):
    """A targets file (``--target @FILE``) that does not hold a target; the message names the file, line and item."""


def _file_error(path, line: int | None, item: str | None, why: str) -> TargetFileError:
    where = str(path) + (f", line {line}" if line else "") + (f", {item}" if item else "")
    return TargetFileError(f"{where}: {why}")


def _target_value(value, path, line, item) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _file_error(path, line, item, f"expected a number, got {value!r:.40}")
    if not math.isfinite(value):
        raise _file_error(path, line, item, f"expected a finite number, got {value!r}")
    return float(value)


def read_target_file(path: str | Path) -> dict[str, float]:
    """Scores from a targets file: a JSON object ``{"PDI": 80, "IDV": 20}`` (or ``{"scores": {...}}``), or lines of
    ``DIM=NUMBER`` (blank lines and ``#`` comments skipped). Every error names the file, the line and the item."""
    path = Path(path)
    try:
        data = path.read_bytes()[: TARGET_FILE_MAX_BYTES + 1]
    except OSError as e:
        raise _file_error(path, None, None, f"cannot read the targets file: {e.strerror or e}") from None
    if len(data) > TARGET_FILE_MAX_BYTES:
        raise _file_error(path, None, None, f"larger than {TARGET_FILE_MAX_BYTES} bytes: not a targets file")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise _file_error(path, data.count(b"\n", 0, e.start) + 1, None,
                          f"not UTF-8 (byte {data[e.start]:#04x} at offset {e.start})") from None
    scores: dict[str, float] = {}
    if text.lstrip().startswith("{"):
        try:
            raw = json.loads(text, object_pairs_hook=_Pairs)  # pairs, so a key given twice is seen
        except json.JSONDecodeError as e:
            raise _file_error(path, e.lineno, f"column {e.colno}", f"not valid JSON: {e.msg}") from None
        prefix = "$"
        inner = dict(raw).get("scores", _Pairs()) if isinstance(raw, _Pairs) else None
        if isinstance(inner, _Pairs) and inner:
            raw, prefix = inner, "$.scores"
        elif isinstance(raw, _Pairs) and any(k == "scores" for k, _ in raw):
            raise _file_error(path, _key_line(text, "scores"), "$.scores", "must be an object of DIM: NUMBER")
        for key, value in raw:
            line, item = _key_line(text, key), f"{prefix}.{key}"
            dim = key.upper() if isinstance(key, str) else key
            if dim not in DIMENSIONS:
                raise _file_error(path, line, item, f"unknown dimension {key!r}; dimensions are {', '.join(DIMENSIONS)}")
            if dim in scores:
                raise _file_error(path, line, item, f"dimension {dim} given twice")
            scores[dim] = _target_value(value, path, line, item)
    else:
        for n, row in enumerate(text.splitlines(), 1):
            row = row.split("#", 1)[0].strip()
            if not row:
                continue
            for part in row.split(","):
                m = _CUSTOM.match(part)
                if not m:
                    raise _file_error(path, n, f"term {part.strip()!r:.40}", "expected DIM=NUMBER, e.g. PDI=80")
                dim = m.group(1).upper()
                if dim not in DIMENSIONS:
                    raise _file_error(path, n, f"term {part.strip()!r}",
                                      f"unknown dimension {dim!r}; dimensions are {', '.join(DIMENSIONS)}")
                if dim in scores:
                    raise _file_error(path, n, f"term {part.strip()!r}", f"dimension {dim} given twice")
                scores[dim] = float(m.group(2))
    if not scores:
        raise _file_error(path, None, None, "no DIM=NUMBER scores in the file")
    return scores


class _Pairs(list):
    """A JSON object as its (key, value) pairs, in file order."""


def _key_line(text: str, key) -> int | None:
    m = re.search(re.escape(json.dumps(key)) + r"\s*:", text) if isinstance(key, str) else None
    return text.count("\n", 0, m.start()) + 1 if m else None


def parse_custom(spec: str, name: str = "custom") -> Target:
    """``PDI=80,IDV=20,...`` -> a Target over the dimensions given (at least one); ``@FILE`` reads them from a
    targets file (see :func:`read_target_file`)."""
    if spec.startswith("@"):
        scores = read_target_file(spec[1:])
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name):
            raise ValueError(f"bad target name {name!r}: use letters, digits, '_' or '-' (at most 64)")
        missing = tuple(d for d in DIMENSIONS if d not in scores)
        return Target(name, name, scores, f"custom target from {spec[1:]}", None, missing)
    scores: dict[str, float] = {}
    for part in spec.split(","):
        m = _CUSTOM.match(part)
        if not m:
            raise ValueError(f"bad target term {part.strip()!r}: expected DIM=NUMBER, e.g. PDI=80")
        dim = m.group(1).upper()
        if dim not in DIMENSIONS:
            raise ValueError(f"unknown dimension {dim!r}; dimensions are {', '.join(DIMENSIONS)}")
        if dim in scores:
            raise ValueError(f"dimension {dim} given twice")
        scores[dim] = float(m.group(2))
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name):
        raise ValueError(f"bad target name {name!r}: use letters, digits, '_' or '-' (at most 64)")
    missing = tuple(d for d in DIMENSIONS if d not in scores)
    return Target(name, name, scores, "custom target", None, missing)
