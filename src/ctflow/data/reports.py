"""CT-RATE style radiology reports for procedural phantoms.

:func:`phantom_report` turns a phantom's ground truth (see
:func:`ctflow.data.phantom.make_phantom`) into the four text fields of a
CT-RATE report. Each sentence is drawn from a few templates with a seeded RNG,
absent findings get explicit negative sentences, and only findings that are
visible in the scanned range are reported (the same rule the CT-RATE labels of
the ground truth follow). The slice-count meta line is not written here.

:func:`attributes_from_report` reads the findings back from report wording, and
:func:`finding_vector` turns them into the numbers a ``num_findings`` flow
transformer is conditioned on.
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

from ctflow.errors import CTFlowError

ATTRIBUTE_KEYS: tuple[str, ...] = ("effusion", "cardiomegaly", "nodule", "emphysema", "consolidation")
EFFUSION_VALUES: tuple[str, ...] = ("none", "left", "right", "bilateral")
# finding_vector's entries, in order
FINDING_NAMES: tuple[str, ...] = (
    "effusion_left",
    "effusion_right",
    "cardiomegaly",
    "nodule",
    "emphysema",
    "consolidation",
)

_CLINICAL = (
    "Cough.",
    "Shortness of breath.",
    "Chest pain.",
    "Fever and cough.",
    "Dyspnea.",
    "Follow-up.",
    "Routine control.",
    "Not given.",
    "Evaluation of the lungs.",
    "Smoking history, screening.",
)

_TECHNIQUE_PLAIN = (
    "Non-contrast chest CT was obtained with {t} mm slice thickness.",
    "Chest CT without intravenous contrast was performed with {t} mm slice thickness.",
    "Thorax CT examination was performed without contrast; axial images were reconstructed with {t} mm slice thickness.",
)
_TECHNIQUE_CONTRAST = (
    "Contrast-enhanced chest CT was obtained with {t} mm slice thickness.",
    "Chest CT with intravenous contrast was performed with {t} mm slice thickness.",
    "Thorax CT examination was performed after intravenous contrast; axial images were reconstructed with {t} mm slice thickness.",
)

_TRACHEA = (
    "Trachea and both main bronchi are in normal width and patent.",
    "Trachea and both main bronchi are patent, and no obstructive pathology is detected in the lumen.",
    "The trachea and main bronchi are open and of normal caliber.",
)
_MEDIASTINUM = (
    "Mediastinal main vascular structures are of normal width.",
    "The calibers of the mediastinal main vascular structures are normal.",
    "Mediastinal vascular structures show normal width and course.",
)
_HEART_NORMAL = (
    "Heart size is normal.",
    "Heart contour and size are normal.",
    "The heart is of normal size.",
)
_HEART_ENLARGED = (
    "Heart size is enlarged.",
    "The heart is enlarged (cardiomegaly).",
    "Cardiomegaly is present, with increased heart size.",
)
_PERICARDIAL = (
    "Pericardial effusion was not observed.",
    "No pericardial effusion or thickening was detected.",
    "Pericardial effusion-thickening is absent.",
)
_ESOPHAGUS = (
    "Thoracic esophagus calibration was normal.",
    "No significant wall thickening was detected in the thoracic esophagus.",
)
_LYMPH = (
    "No lymph node in pathological size and appearance was detected in the mediastinum and hila.",
    "No mediastinal or hilar lymphadenopathy was detected.",
)
_PARENCHYMA_INTRO = (
    "When examined in the lung parenchyma window;",
    "In the lung parenchyma window;",
    "Lung parenchyma:",
)
_EMPHYSEMA_POS = (
    "Emphysematous changes are observed in both lungs, more prominent in the upper lobes.",
    "Centrilobular emphysema is present in both lungs.",
    "There are emphysematous areas of low attenuation in both lungs.",
)
_EMPHYSEMA_NEG = (
    "No emphysema was detected.",
    "There is no emphysema in either lung.",
    "No emphysematous change is seen.",
)
_NODULE_POS = (
    "A {n} mm nodule is seen in the {lobe}.",
    "A {n} mm nodule is observed in the {lobe}.",
    "There is a {n} mm solid nodule in the {lobe}.",
)
_NODULE_NEG = (
    "No mass or nodule was detected in either lung.",
    "No pulmonary nodule or mass is seen.",
    "No nodular lesion was detected in both lungs.",
)
_CONSOLIDATION_POS = (
    "Consolidation with air bronchograms is observed in the {lobe}.",
    "An area of consolidation is seen in the {lobe}.",
    "There is consolidation in the {lobe}.",
)
_CONSOLIDATION_NEG = (
    "No consolidation or infiltrative lesion was detected.",
    "There is no consolidation in either lung.",
    "No pneumonic consolidation is seen.",
)
_EFFUSION_POS = {
    "left": (
        "Left-sided pleural effusion is present.",
        "Pleural effusion is seen on the left side.",
        "There is a left pleural effusion.",
    ),
    "right": (
        "Right-sided pleural effusion is present.",
        "Pleural effusion is seen on the right side.",
        "There is a right pleural effusion.",
    ),
    "bilateral": (
        "Bilateral pleural effusion is present.",
        "Pleural effusion is seen on both sides.",
        "There are bilateral pleural effusions.",
    ),
}
_EFFUSION_NEG = (
    "No pleural effusion was detected.",
    "No pleural effusion or thickening was observed.",
    "There is no pleural effusion.",
)
_ABDOMEN = (
    "Upper abdominal organs included in the sections are normal.",
    "No abnormality was detected in the upper abdominal organs within the scan range.",
)
_BONES = (
    "Bone structures in the study area are natural.",
    "No lytic or destructive lesion was detected in the bone structures.",
    "Vertebral corpus heights are preserved and bone structures are normal.",
)
NORMAL_IMPRESSION = "No significant pathology was detected in the chest."


def lobe_phrase(lobe: str, style: int = 0) -> str:
    """``"right upper"`` -> ``"upper lobe of the right lung"`` (style 0) or ``"right upper lobe"`` (style 1)."""
    side, part = lobe.split()
    return f"{part} lobe of the {side} lung" if style == 0 else f"{side} {part} lobe"


def _visible(findings: list[dict], kind: str) -> list[dict]:
    return [f for f in findings if f.get("type") == kind and f.get("visible", True)]


def _fmt_mm(v: float) -> str:
    return f"{float(v):g}"


def phantom_report(ground_truth: dict, seed: int | None = None) -> dict[str, str]:
    """A CT-RATE style report ``{ClinicalInformation_EN, Technique_EN, Findings_EN, Impressions_EN}``.

    ``seed`` picks the wording (default: the phantom's seed); the same ground truth
    and seed always give the same text.
    """
    if not isinstance(ground_truth, dict) or "findings" not in ground_truth:
        raise CTFlowError("phantom_report needs a phantom ground-truth dict with a 'findings' list")
    spec: dict[str, Any] = ground_truth.get("spec", {}) or {}
    if seed is None:
        seed = int(spec.get("seed", 0))
    rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, 0x5EED])

    def pick(options):
        return options[int(rng.integers(len(options)))]

    findings = list(ground_truth["findings"])
    thickness = spec.get("slice_spacing")
    if thickness is None:
        thickness = (ground_truth.get("spacing") or [2.5])[0]
    contrast = bool(ground_truth.get("contrast", spec.get("contrast", False)))

    nodules = _visible(findings, "nodule")
    effusions = _visible(findings, "effusion")
    cardio = _visible(findings, "cardiomegaly")
    emph = _visible(findings, "emphysema")
    consol = _visible(findings, "consolidation")

    clinical = pick(_CLINICAL)
    technique = pick(_TECHNIQUE_CONTRAST if contrast else _TECHNIQUE_PLAIN).format(t=_fmt_mm(thickness))

    lobe_style = int(rng.integers(2))
    sent = [pick(_TRACHEA), pick(_MEDIASTINUM)]
    sent.append(pick(_HEART_ENLARGED) if cardio else pick(_HEART_NORMAL))
    sent += [pick(_PERICARDIAL), pick(_ESOPHAGUS), pick(_LYMPH), pick(_PARENCHYMA_INTRO)]
    sent.append(pick(_EMPHYSEMA_POS) if emph else pick(_EMPHYSEMA_NEG))
    if nodules:
        for f in nodules:
            n = int(round(float(f.get("size_mm", 10.0))))
            sent.append(pick(_NODULE_POS).format(n=n, lobe=lobe_phrase(f["lobe"], lobe_style)))
    else:
        sent.append(pick(_NODULE_NEG))
    if consol:
        for f in consol:
            sent.append(pick(_CONSOLIDATION_POS).format(lobe=lobe_phrase(f["lobe"], lobe_style)))
    else:
        sent.append(pick(_CONSOLIDATION_NEG))
    if effusions:
        sides = {f["side"] for f in effusions}
        side = "bilateral" if ("bilateral" in sides or sides == {"left", "right"}) else sides.pop()
        sent.append(pick(_EFFUSION_POS[side]))
    else:
        sent.append(pick(_EFFUSION_NEG))
    sent += [pick(_ABDOMEN), pick(_BONES)]

    impressions = []
    for f in nodules:
        n = int(round(float(f.get("size_mm", 10.0))))
        impressions.append(f"{n} mm nodule in the {lobe_phrase(f['lobe'], 1)}.")
    for f in consol:
        impressions.append(f"Consolidation in the {lobe_phrase(f['lobe'], 1)}.")
    if effusions:
        sides = {f["side"] for f in effusions}
        side = "bilateral" if ("bilateral" in sides or sides == {"left", "right"}) else next(iter(sides))
        impressions.append(
            "Bilateral pleural effusion." if side == "bilateral" else f"{side.capitalize()} pleural effusion."
        )
    if cardio:
        impressions.append("Cardiomegaly.")
    if emph:
        impressions.append("Emphysema.")
    return {
        "ClinicalInformation_EN": clinical,
        "Technique_EN": technique,
        "Findings_EN": " ".join(sent),
        "Impressions_EN": " ".join(impressions) if impressions else NORMAL_IMPRESSION,
    }


# ---------------------------------------------------------------- reading reports
# a line that ends in one of these words goes on in the next ("No effusion or\nConsolidation.", "The
# heart is\nenlarged.", "a small left pleural\neffusion"), as does a line that starts with one of the first
LINE_GOES_ON = re.compile(
    r"\b(?:and|or|nor|of|in|on|at|to|the|a|an|with|without|for|by|from|is|are|was|were|be|been|has"
    r"|have|had|appears?|seems?|pleural|pulmonary|small|large|mild|moderate|severe|suspicious|left|right"
    r"|bilateral|upper|middle|lower|very|mildly|slightly|markedly)$",
    re.I,
)
LINE_GOES_ON_NEXT = re.compile(r"(?:or|and|nor|with|without|of|in)\b", re.I)
INVISIBLE = dict.fromkeys(map(ord, "\ufeff\u200b\u200c\u200d\u2060"), " ")  # BOM, zero-width spaces
WRAPPED_LINE = 40  # characters: a line at least this long and near the longest is a paragraph's wrap


def one_line(report: str) -> str:
    """``report`` on one line: a byte-order mark and zero-width spaces dropped, every run of whitespace
    one space, and a line break that ends a line without punctuation given a full stop, so a report
    typed line by line ("Findings:\nNo pleural effusion\nCardiomegaly") keeps its sentences apart
    and one line's "No" does not reach the next. A break is a wrap, not a sentence end, after a word
    that goes on ("or", "the", ...) or after a line as long as a hard-wrapped paragraph's (at least
    WRAPPED_LINE characters and 80% of the longest line)."""
    lines = report.translate(INVISIBLE).replace("\r\n", "\n").replace("\r", "\n").split("\n")
    longest = max(len(line.strip()) for line in lines)
    parts, prev = [], ""
    for line in map(str.strip, lines):
        if not line:
            continue
        if prev:
            ended = prev[-1] in ".;:,!?"
            wrapped = (
                LINE_GOES_ON.search(prev[-12:])
                or LINE_GOES_ON_NEXT.match(line)
                or len(prev) >= max(WRAPPED_LINE, 0.8 * longest)
            )
            parts.append(" " if ended or wrapped else ". ")
        parts.append(line)
        prev = line
    return " ".join("".join(parts).split())


# "cannot be (entirely) excluded", "is not ruled out", "no significant change in the effusion"
_HEDGE = re.compile(
    r"\b(?:cannot|can't|could not|can not|may not|not)\s+be\s+(?:\w+ly\s+)?(?:excluded|ruled out)\b"
    r"|\b(?:is|are|was|were)\s+not\s+(?:\w+ly\s+)?(?:excluded|ruled out)\b"
    r"|\bno\s+(?:significant\s+|interval\s+|appreciable\s+|substantial\s+)?change\b"
    r"|\bnot\s+(?:significantly\s+)?changed\b"
    r"|\bpartial(?:ly)?\s+(?:resolution\s+of|resolved|cleared)\b|\bdocument\s+(?:the\s+)?resolution\s+of\b"
)
_NEGATION = re.compile(
    r"\b(?:no|not|nil|without|absent|absence of|lack of|neither|nor|resolved|resolution of"
    r"|disappeared|cleared|free of|clear of|negative for|ruled out|excluded)\b|n't"
    # "none" but not "none of the nodules shows growth"; "negative" alone at the end ("effusion: negative."),
    # not "a PET-negative nodule"
    r"|\bnone\b(?!\s+of\b)|(?<![-\w])negative\s*[.;]?\s*$"
    r"|\bcannot be (?:seen|identified|detected|demonstrated|visualized)\b"
)
# where a negation's reach ends: "The heart is enlarged, without pericardial effusion." negates the
# effusion, not the heart; "A 6 mm nodule without calcification." keeps the nodule; "Mild
# cardiomegaly and no pleural effusion." keeps the heart
_CLAUSE_BREAK = re.compile(
    r";|\b(?:but|while|whereas|however|although)\b|(?=\bwith(?:out)?\b)"
    r"|\band\b(?=\s+(?:there\s+(?:is|are)\s+)?(?:no|not|without)\b)"
)
# a comma-separated part that starts a statement of its own, which a negation before it does not reach
# ("No effusion, the heart is enlarged."; "No pleural effusion, mild cardiomegaly."); any other part
# goes on a negated list ("No pleural effusion, nodule or consolidation.")
_NEW_STATEMENT = re.compile(
    r"(?:a|an|the|there|it|this|these|those|which|small|mild|moderate|large|massive|trace|minimal|slight"
    r"|left|right|bilateral|multiple|several|scattered|few|numerous|centrilobular|paraseptal|panlobular"
    r"|heart|cardiac)\b|\d"
)
# a part with a verb of its own states something ("No lymphadenopathy, cardiomegaly is present."),
# unless it is a list's "or" ("No pleural effusion, nodule or consolidation is seen.")
_STATEMENT_VERB = re.compile(
    r"\b(?:is|are|was|were|present|seen|noted|observed|identified)\b"
    r"|\b(?:in|at|within|involving)\s+(?:the|both|either)\b|\blobes?\b"  # or where it is
)
_LIST_OR = re.compile(r"\b(?:or|nor)\b")
# sentence ends; a heading's colon is dropped with the heading, another colon does not end the
# sentence ("Nodule: none.", "Pleural effusion: left.")
# a bullet typed on one line ends a sentence too ("\u2022 No effusion \u2022 Cardiomegaly"); a spaced hyphen
# does not ("Pleural effusion - left."), and clean_report ends a line-per-item list's sentences
_SENTENCE_END = re.compile(r"(?<=[.;!?])\s+|(?<!\s)\s*\u2022\s*")
_HEADING = re.compile(r"\b(?:findings|impressions?|conclusions?)\s*:\s*")
# sections that say why the scan was made, not what it shows ("Indication: rule out effusion.")
_NOT_FINDINGS = re.compile(
    r"^(?:indications?|clinical (?:information|history)|history|reason for (?:exam|examination|study)"
    r"|technique)\s*:"
)

# the side words, as a finding's side and as a comma part of their own ("Pleural effusion, right.")
_SIDES = r"left|right|bilateral(?:ly)?|bilat\.?|b/l|both sides|both hemithora\w*"
_SIDE_OR_FINDING = re.compile(
    rf"\b(?P<side>{_SIDES})(?!\w)|\b(?P<finding>"
    r"effusions?|hydrothorax|fluid|consolidations?|(?:micro)?nodul\w*|emphysem\w*|cardiomegaly|atelectasis|opacit\w*|mass"
    r"|pneumothorax|thickening|lymphadenopathy|tube|shift)\b"
)
EFFUSION_WORDS = ("effusion", "hydrothorax", "fluid")
_SIDE_ONLY = re.compile(
    rf"(?:(?:on|in|at)\s+)?(?:the\s+)?(?:{_SIDES})(?:[\s-]+(?:side|sided|hemithorax|base))?"
)
_CARDIOMEGALY = re.compile(
    r"\bcardiomegaly\b|\b(?:heart|cardiac)\b(?:\W+(?!(?:or|with|normal)\b)\w+){0,5}?\W+"
    r"(?:enlarged|increased|enlargement)\b"
    r"|\b(?:enlarged|increased)\s+(?:heart|cardiac)\b"
)
_NODULE = re.compile(r"\b(?:micro)?nodul")
# a nodule of another organ named in a clause that names no lung
_OTHER_ORGAN = re.compile(r"\b(?:thyroid|adrenal|liver|hepatic|renal|kidney|spleen|splenic|breast)\b")
_LUNG = re.compile(r"\b(?:lung|pulmonary|lingula)|\b(?:upper|middle|lower) lobe")
# gas in soft tissue, not lung emphysema
_OTHER_EMPHYSEMA = re.compile(
    r"(?<!and )(?<!, )\b(?:subcutaneous|mediastinal|soft[- ]tissue|surgical)\s+emphysema"
)


def _effusion_sides(clause: str) -> str:
    """The side words of a clause that go with its effusion: each side word belongs to the next finding
    named after it, or to the last one before it when none follows ("Bilateral lower lobe consolidation
    and a left pleural effusion." is left; "Pleural effusion is seen on the left side." is left).
    "bilaterally" and "both hemithoraces" are given as "bilateral"."""
    found: list[tuple[str, str]] = []  # (kind, word) in order
    for m in _SIDE_OR_FINDING.finditer(clause):
        found.append(("side", m["side"]) if m["side"] else ("finding", m["finding"]))
    # the finding named after and before each place, in one pass each way (a scan per side word was
    # quadratic in a long run of them)
    after: list[str | None] = [None] * (len(found) + 1)
    for i in range(len(found) - 1, -1, -1):
        after[i] = found[i][1] if found[i][0] == "finding" else after[i + 1]
    words, before = [], None
    for i, (kind, word) in enumerate(found):
        if kind == "finding":
            before = word
        elif (after[i + 1] or before or "").startswith(EFFUSION_WORDS):
            words.append(word)
    if not words:  # a side shared with a finding named first: "Right pleural thickening and effusion."
        first = next(
            (i for i, (k, w) in enumerate(found) if k == "finding" and w.startswith(EFFUSION_WORDS)), 0
        )
        words = [w for k, w in found[:first] if k == "side"]
    return " ".join("bilateral" if w.startswith(("bilat", "b/l", "both hemithora")) else w for w in words)


def _sentences(text: str) -> list[str]:
    """Lower-cased sentences, headings ("Findings:") dropped and the reasons for the scan left out."""
    out = []
    text = _HEADING.sub(". ", one_line(text).lower().replace("\u2019", "'"))  # a heading mid-line starts one
    for s in _SENTENCE_END.split(text):
        s = s.strip(" .")
        if s and not _NOT_FINDINGS.match(s):
            out.append(s)
    return out


def _clauses(text: str) -> list[str]:
    """Lower-cased clauses of a report: sentences cut where a negation's reach ends. A part after a
    comma that continues a negated list is given the negation ("no pleural effusion, nodule or
    consolidation" -> "no pleural effusion", "no nodule or consolidation")."""
    out = []
    for sentence in _sentences(text):
        for clause in _CLAUSE_BREAK.split(sentence):
            negated = False
            for part in _side_parts_joined((clause or "").split(",")):
                part = part.strip()
                if not part:
                    continue
                positive = _positive(part)
                states = _STATEMENT_VERB.search(part) and not _LIST_OR.search(part)
                if negated and positive and not _NEW_STATEMENT.match(part) and not states:
                    part = f"no {part}"
                    positive = _positive(part)
                negated = not positive
                out.append(part)
    return out


def _side_parts_joined(parts: list[str]) -> list[str]:
    """Comma-separated parts, a part that is a side phrase alone joined to the next (or, last, to the
    one before): "On the left, there is a small pleural effusion."; "Pleural effusion, right.". A part
    that says something of the side ("right lung is clear") stays apart."""
    out: list[str] = []
    waiting = ""
    for part in parts:
        if _SIDE_ONLY.fullmatch(part.strip()):
            waiting += part + " "
            continue
        out.append(waiting + part)
        waiting = ""
    if waiting:
        out = [*out[:-1], (out[-1] + " " if out else "") + waiting.strip()]
    return out


def _positive(clause: str) -> bool:
    return _NEGATION.search(_HEDGE.sub(" ", clause)) is None


def _pleural_effusion(low: str) -> bool:
    # a lower-cased clause that names a pleural effusion (not only a pericardial one) without negating it
    named = "effusion" in low or "hydrothorax" in low or ("fluid" in low and "pleura" in low)
    return named and ("pleura" in low or "pericardi" not in low) and _positive(low)


def attributes_from_report(text: str) -> dict:
    """The same keys parsed from report wording (``ctflow.data.reports`` phrasing and close variants).

    A finding counts when a clause names it without a negation ("No pleural effusion was detected."
    is negative; "The heart is enlarged, without pericardial effusion." names an enlarged heart and
    no effusion; "No pleural effusion, nodule or consolidation." negates all three, "No pleural
    effusion, mild cardiomegaly." only the effusion; "Nodule: none."; "A nodule cannot be excluded."
    keeps it). Pericardial effusion is not pleural, subcutaneous emphysema is not the lungs', a
    thyroid nodule not a lung nodule; the reasons for the scan ("Indication: ...") are not findings.
    A side is read from the clause that names the effusion ("Right pleural effusion with mediastinal
    shift to the left." is right), from the side words that go with it ("Bilateral lower lobe
    consolidation and a left pleural effusion." is left).
    """
    return _read(text)[0]


def _read(text: str) -> tuple[dict, bool]:
    """:func:`attributes_from_report`'s findings, and whether any clause names a pleural effusion (a
    side or not), from one reading of the report."""
    if not isinstance(text, str):
        raise CTFlowError(f"attributes_from_report needs report text; got {type(text).__name__}")
    out = {
        "effusion": "none",
        "cardiomegaly": False,
        "nodule": False,
        "emphysema": False,
        "consolidation": False,
    }
    right = left = named = False
    for low in _clauses(text):
        pos = _positive(low)
        if _pleural_effusion(low):
            named = True
            side = _effusion_sides(low)
            if "bilateral" in side or "both sides" in side or ("left" in side and "right" in side):
                right = left = True
            elif "left" in side:
                left = True
            elif "right" in side:
                right = True
            elif re.search(r"\beffusions\b", low):  # "Small pleural effusions.": one on each side
                right = left = True
        if pos and _CARDIOMEGALY.search(low):
            out["cardiomegaly"] = True
        if pos and _NODULE.search(low) and not (_OTHER_ORGAN.search(low) and not _LUNG.search(low)):
            out["nodule"] = True
        if pos and "emphysem" in _OTHER_EMPHYSEMA.sub(" ", low):
            out["emphysema"] = True
        if pos and "consolidat" in low:
            out["consolidation"] = True
    out["effusion"] = "bilateral" if right and left else "right" if right else "left" if left else "none"
    return out, named


def finding_vector(text: str) -> list[float]:
    """The findings a report names, as :data:`FINDING_NAMES` flags (1 named, 0 not).

    A bilateral effusion sets both sides, as do "pleural effusions" (plural) without a side word. An
    effusion named without a side sets both to 0.5 (present, side unknown); phantom reports always
    name the side, so a model trained on them has not seen it.
    """
    a, named = _read(text)
    side = a["effusion"]
    left = float(side in ("left", "bilateral"))
    right = float(side in ("right", "bilateral"))
    if side == "none" and named:
        left = right = 0.5  # named, but no sentence that names it says a side (else side != "none")
    return [left, right, *(float(a[k]) for k in ("cardiomegaly", "nodule", "emphysema", "consolidation"))]
