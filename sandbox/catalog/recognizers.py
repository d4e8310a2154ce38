"""Direct-identifier recognizers for presidio-analyzer that need no NLP model: patterns, checksums, name lists.

Each recognizer's `analyze(text, entities, nlp_artifacts=None)` works on plain text alone, so nothing here loads
spaCy or any model. Importing this module imports presidio (seconds): `sandbox.catalog.deid` imports it lazily.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

from presidio_analyzer import EntityRecognizer, Pattern, PatternRecognizer, RecognizerResult
from presidio_analyzer.nlp_engine import NlpArtifacts
from presidio_analyzer.predefined_recognizers import PhoneRecognizer

from sandbox.catalog.identifier_patterns import (
    ADDRESS,
    AFTER_NAME,
    BEFORE_TITLE_FORM,
    CN_CONTEXT,
    CN_PERSON,
    CN_TITLE,
    COLON,
    DATE,
    DATE_OF_BIRTH,
    EMAIL_ADDRESS,
    HAN,
    LATIN_WORD,
    MEDICAL_RECORD_NUMBER,
    MRN_ID,
    PERSON,
    PHONE_NUMBER,
    PRC_RESIDENT_ID,
    STREET_TYPES,
    US_STATES,
    _given_name,
    _not_surname,
    english_first_names,
    english_surnames,
    first_name_alternation,
    surname_alternation,
    surname_latin_alternation,
    valid_prc_id,
)


def _result(recognizer: EntityRecognizer, start: int, end: int, score: float) -> RecognizerResult:
    return RecognizerResult(
        entity_type=recognizer.supported_entities[0], start=start, end=end, score=score,
        recognition_metadata={RecognizerResult.RECOGNIZER_NAME_KEY: type(recognizer).__name__,
                              RecognizerResult.RECOGNIZER_IDENTIFIER_KEY: recognizer.id})


class PrcResidentIdRecognizer(PatternRecognizer):
    """18-digit PRC resident identity numbers, kept only with a real birth date and a right check digit; 15-digit
    legacy numbers only beside words naming an identity card."""

    ID_CONTEXT = re.compile(r"身份证|身份号|证件号|公民身份|(?i:id\s*(?:card|no|number)|identity|national\s*id)")

    def __init__(self) -> None:
        boundary_before, boundary_after = r"(?<![0-9A-Za-z])", r"(?![0-9A-Za-z])"
        super().__init__(
            supported_entity=PRC_RESIDENT_ID, name="PrcResidentIdRecognizer", supported_language="zh",
            patterns=[
                Pattern("prc_id_18", rf"{boundary_before}[1-9]\d{{5}}(?:18|19|20)\d{{2}}(?:0[1-9]|1[0-2])"
                                     rf"(?:0[1-9]|[12]\d|3[01])\d{{3}}[\dXx]{boundary_after}", 0.5),
                Pattern("prc_id_15", rf"{boundary_before}[1-9]\d{{7}}(?:0[1-9]|1[0-2])(?:0[1-9]|[12]\d|3[01])"
                                     rf"\d{{3}}{boundary_after}", 0.3),
            ],
            context=["身份证", "id"], global_regex_flags=re.DOTALL)

    def validate_result(self, pattern_text: str) -> bool:
        return valid_prc_id(pattern_text)

    def analyze(self, text: str, entities: list[str], nlp_artifacts: NlpArtifacts | None = None,
                regex_flags: int | None = None) -> list[RecognizerResult]:
        results: list[RecognizerResult] = super().analyze(text, entities, nlp_artifacts, regex_flags)
        # Fifteen digits with a plausible date are common outside identity numbers (accession and order numbers).
        if any(r.end - r.start == 15 for r in results) and not self.ID_CONTEXT.search(text):
            results = [r for r in results if r.end - r.start != 15]
        return results


class _RegexRecognizer(EntityRecognizer):
    """A recognizer over Python regular expressions whose `value` group (or whole match) is the identifier."""

    SCORE = 0.85

    def __init__(self, entity: str, patterns: Iterable[re.Pattern[str]], *, language: str = "en") -> None:
        self.patterns = tuple(patterns)
        super().__init__(supported_entities=[entity], name=type(self).__name__, supported_language=language)

    def load(self) -> None:
        """Nothing to load: the patterns are compiled at construction."""

    def spans(self, text: str) -> Iterator[tuple[int, int]]:
        for pattern in self.patterns:
            for match in pattern.finditer(text):
                group = "value" if "value" in pattern.groupindex else 0
                if match.start(group) < match.end(group) and self.accept(match.group(group)):
                    yield match.start(group), match.end(group)

    def accept(self, value: str) -> bool:
        return True

    def analyze(self, text: str, entities: list[str], nlp_artifacts: NlpArtifacts | None = None
                ) -> list[RecognizerResult]:
        results = [_result(self, start, end, self.SCORE) for start, end in self.spans(text)]
        return list(EntityRecognizer.remove_duplicates(results))


class ChineseNameRecognizer(_RegexRecognizer):
    """Chinese personal names: a listed surname and one or two given-name characters, after a word that
    introduces a person (患者, 姓名, 家属, 医生 ...) or before a title (先生, 女士, 主任 ...)."""

    def __init__(self) -> None:
        surname = surname_alternation()
        super().__init__(CN_PERSON, [], language="zh")
        self.after_context = re.compile(rf"(?:{CN_CONTEXT})[{COLON}\s]{{0,3}}({surname})")
        self.before_title = re.compile(rf"({surname})([{HAN}]{{0,2}}?)(?:{CN_TITLE})")

    def spans(self, text: str) -> Iterator[tuple[int, int]]:
        for match in self.after_context.finditer(text):
            start, end = match.span(1)
            for length in (1, 2):
                given = text[end:end + length]
                if len(given) < length or not _given_name(given):
                    break
                if end + length == len(text) or AFTER_NAME.match(text, end + length):
                    yield start, end + length
                    break
        for match in self.before_title.finditer(text):
            start = match.start(1)
            if start > 0 and text[start - 1] not in BEFORE_TITLE_FORM and "\u4e00" <= text[start - 1] <= "\u9fff":
                continue
            if match.group(2) and not _given_name(match.group(2)):
                continue
            yield start, match.end(2)


class LatinNameRecognizer(_RegexRecognizer):
    """Latin-script names: after a title (Mr, Dr ...), after a word that introduces a person (Patient:, Name:),
    a listed first name followed by a capitalised word, or "Surname, Firstname"."""

    def __init__(self) -> None:
        first, last = first_name_alternation(), surname_latin_alternation()
        super().__init__(PERSON, [
            re.compile(rf"\b(?:Mr|Mrs|Ms|Miss|Mx|Dr|Prof)\.?\s+(?P<value>{LATIN_WORD}(?:\s+{LATIN_WORD})?)"),
            re.compile(rf"\b(?:[Pp]atient(?:\s+[Nn]ame)?|[Nn]ame|[Cc]ontact|[Nn]ext of kin|NOK|[Ss]igned(?:\s+by)?|"
                       rf"[Gg]uardian)\s*[{COLON}]?\s+(?P<value>{LATIN_WORD}(?:\s+{LATIN_WORD})?)"),
            # Not after a house number: "12 Victoria Lane" is a street.
            re.compile(rf"(?<!\d\s)\b(?P<value>{first}\s+(?:[A-Z]\.\s+)?{LATIN_WORD})\b"),
            re.compile(rf"\b(?P<value>{last},\s*{first})\b"),
        ])

    def spans(self, text: str) -> Iterator[tuple[int, int]]:
        _title, context, first_last, _last_comma_first = self.patterns
        for pattern in self.patterns:
            for match in pattern.finditer(text):
                words = list(re.finditer(r"[^\s,]+", match.group("value")))
                if pattern is context and not self._dictionary_name([w.group() for w in words]):
                    continue
                if pattern is first_last and _not_surname(words[-1].group()):
                    continue
                # An eponym's noun ("Addison Disease") or a capitalised word after the name is not part of it.
                while words and _not_surname(words[-1].group()):
                    words.pop()
                if words:
                    yield match.start("value"), match.start("value") + words[-1].end()

    @staticmethod
    def _dictionary_name(words: list[str]) -> bool:
        return any(w in english_first_names() or w in english_surnames() for w in words)


class PrcPhoneRecognizer(PatternRecognizer):
    """PRC mobile numbers (1[3-9] and nine digits, with optional +86 and separators) and landlines (area code 0xx
    or 0xxx with a separator, then 7 or 8 digits)."""

    def __init__(self) -> None:
        super().__init__(
            supported_entity=PHONE_NUMBER, name="PrcPhoneRecognizer", supported_language="zh",
            patterns=[
                Pattern("prc_mobile", r"(?<![\d+])(?:(?:\+|00)86[\s-]?)?1[3-9]\d[\s-]?\d{4}[\s-]?\d{4}(?!\d)", 0.6),
                Pattern("prc_landline", r"(?<![\d+])(?:\(0\d{2,3}\)\s?|0\d{2,3}-)\d{7,8}(?!\d)", 0.5),
                Pattern("prc_landline_intl", r"(?:\+|00)86[\s-]?\d{2,3}[\s-]\d{7,8}(?!\d)", 0.5),
            ],
            context=["电话", "手机", "phone", "tel", "mobile"], global_regex_flags=re.DOTALL)


def international_phone_recognizer() -> PhoneRecognizer:
    """presidio's phonenumbers-based recognizer for US and UK numbers (and any written with a + country code)."""
    return PhoneRecognizer(supported_regions=("US", "GB"), supported_language="en")


class OfflineEmailRecognizer(PatternRecognizer):
    """Email addresses, by pattern alone: presidio's own recognizer asks tldextract, which may fetch the public
    suffix list from the network. (Named apart from presidio's EmailRecognizer: presidio's registry finds
    recognizer classes by name.)"""

    def __init__(self) -> None:
        super().__init__(
            supported_entity=EMAIL_ADDRESS, name="OfflineEmailRecognizer",
            patterns=[Pattern("email", r"(?<![\w.%+-])[A-Za-z0-9][A-Za-z0-9._%+-]*@(?:[A-Za-z0-9-]+\.)+"
                                       r"[A-Za-z]{2,24}(?![A-Za-z0-9-])", 0.8)],
            global_regex_flags=re.DOTALL)


class AddressRecognizer(PatternRecognizer):
    """Street addresses: Chinese (a road, street or lane with a house number: 路/街/巷/弄 ... 号; a housing estate
    with building and room), English (number, name, street type) and UK and US postcodes."""

    def __init__(self) -> None:
        super().__init__(
            supported_entity=ADDRESS, name="AddressRecognizer",
            patterns=[
                Pattern("zh_street", rf"[{HAN}]{{2,12}}?(?:路|街|大道|巷|胡同|弄)\d{{1,5}}(?:号|弄)"
                                     rf"(?:\d{{1,5}}(?:号楼|号|栋|幢|楼|单元|室))*", 0.7),
                Pattern("zh_estate", rf"[{HAN}]{{2,12}}?(?:小区|花园|公寓|新村|大厦)\d{{1,4}}(?:号楼|栋|幢)"
                                     rf"(?:\d{{1,2}}单元)?(?:\d{{1,5}}室?)?", 0.6),
                Pattern("en_street", rf"\b\d{{1,5}}[A-Za-z]?\s+(?:[A-Z][a-z]+\.?\s+){{1,3}}{STREET_TYPES}\b\.?", 0.7),
                Pattern("uk_postcode", r"\b[A-Z]{1,2}\d[A-Z\d]?\s+\d[A-Z]{2}\b", 0.5),
                Pattern("us_zip", rf"\b(?:{'|'.join(US_STATES)})\s+\d{{5}}(?:-\d{{4}})?\b", 0.5),
            ],
            global_regex_flags=re.DOTALL)


class MedicalRecordNumberRecognizer(_RegexRecognizer):
    """Medical record numbers: an identifier right after MRN, medical record number, 病历号, 住院号, 门诊号 ..."""

    CONTEXT = (r"\bMRN\b|\bM\.R\.N\.?|[Mm]edical [Rr]ecord (?:[Nn]umber|[Nn]o\.?)|[Hh]ospital (?:[Nn]umber|[Nn]o\.?)|"
               r"[Cc]ase (?:[Nn]umber|[Nn]o\.?)|病历号|住院号|门诊号|病案号|就诊号")

    def __init__(self) -> None:
        super().__init__(MEDICAL_RECORD_NUMBER, [re.compile(
            rf"(?:{self.CONTEXT})\s*(?:[{COLON}#]|is|为)?\s*(?P<value>{MRN_ID})(?![0-9A-Za-z])")])


class DateOfBirthRecognizer(_RegexRecognizer):
    """Dates of birth: a date right after DOB, date of birth, born, 出生日期, 生于 ..."""

    def __init__(self) -> None:
        context = (r"\bDOB\b|\bD\.O\.B\.?|[Dd]ate of [Bb]irth|[Bb]irth\s?[Dd]ate|\b[Bb]orn(?:\s+on)?|出生日期|"
                   r"出生年月日?|生日|出生于|生于")
        super().__init__(DATE_OF_BIRTH, [re.compile(rf"(?:{context})\s*[{COLON}]?\s*(?P<value>{DATE})(?!\d)")])
