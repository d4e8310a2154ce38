"""What direct identifiers look like, with no presidio: name lists, patterns, the PRC identity number's check
digit, and the tests a whole cell value passes to be a name, a date or a record number.

`sandbox.catalog.deid` builds its SQL prefilters from these, so a scan that finds no candidate never imports
presidio (and spaCy behind it: seconds); `sandbox.catalog.recognizers` builds presidio recognizers on them.
"""

from __future__ import annotations

import calendar
import re
from functools import cache
from pathlib import Path

DATA = Path(__file__).with_name("data")

PERSON = "PERSON"
CN_PERSON = "CN_PERSON"
PRC_RESIDENT_ID = "PRC_RESIDENT_ID"
PHONE_NUMBER = "PHONE_NUMBER"
EMAIL_ADDRESS = "EMAIL_ADDRESS"
ADDRESS = "ADDRESS"
MEDICAL_RECORD_NUMBER = "MEDICAL_RECORD_NUMBER"
DATE_OF_BIRTH = "DATE_OF_BIRTH"

HAN = "\u4e00-\u9fff"
COLON = ":\uff1a"  # ASCII and full-width


def _words(text: str) -> list[str]:
    return text.split()

# Characters that almost never stand in a given name but start or fill the clinical and function words a
# surname character is often followed by ("高血压", "周期性", "于今日", "阴性", "查体"): a candidate given
# name holding one is read as that word instead.
NOT_GIVEN_NAME = frozenset(
    "血压病症炎癌瘤痛疼肿胀性期某氏科院室床号日月年今昨前后时周次内外部位左右侧型度级例药物剂片针术检查验诊"
    "治疗护理医患者肝脾肺肾胃肠脑骨肤眼耳鼻喉颈胸腹腰背腿脚足臂头液尿便汗痰咳喘热烧吐泻晕麻痒酸扩张缩梗塞栓"
    "糖脂酶素钾钠钙常异无有不未已可疑并及与和或等的了着过是为在于对从向被把给将让使由因所而则就都也还又再才"
    "只很最更差低多少短入出住诉述见示予行服用项阴规重显身体房间量值率疸淋颤疹痘疮癣疖痔瘫痪痫疝癫痹瘀脓疱痂痿瘘"
    "癜疣痣疡溃衰竭疲乏倦困人"
)
# What may follow a name in clinical Chinese: punctuation, a sex, or the verbs a note goes on with.
AFTER_NAME = re.compile(rf"[^{HAN}]|男|女|因|于|主诉|诉|自述|今|昨|入院|来|就诊|先生|女士|之|的|家属")
CN_CONTEXT = "患者|病人|患儿|病患|姓名|家属|联系人|监护人|签名|主治医生|医生|医师|大夫|主任|护士"
CN_TITLE = "先生|女士|小姐|医生|医师|大夫|主任|护士|教授|老师"
# Characters that may stand right before "王医生" when the title form names someone ("由王医生查房").
BEFORE_TITLE_FORM = frozenset("由请与和及向被给经对据称同把让找、\uff0c,\u3002\uff1b;\uff1a:\uff08( \t\n")

# Capitalised words that follow a first name or an eponym without making a person ("Grace Hospital",
# "Addison Disease").
NOT_SURNAME = frozenset(_words(
    "Disease Syndrome Sign Test Score Scale Criteria Classification Procedure Operation Hospital Clinic Centre Center "
    "Street Road Avenue Lane Drive Ward Unit Trust Foundation University College School House Lymphoma Sarcoma Palsy "
    "Tumour Tumor Fracture Reflex Phenomenon Manoeuvre Maneuver Type Stage Grade Protocol Study Trial Day Week Month "
    "Monday Tuesday Wednesday Thursday Friday Saturday Sunday January February March April May June July August "
    "September October November December St Rd Ave Ln Dr Blvd Ct Pl Sq Bengal"))
LATIN_WORD = r"(?:Mc|Mac|O')?[A-Z][a-z]+(?:[-'][A-Z]?[a-z]+)?"
MONTHS = r"(?:Jan(?:uary)?|Feb(?:ruary)?|Mar(?:ch)?|Apr(?:il)?|May|June?|July?|Aug(?:ust)?|Sep(?:t(?:ember)?)?|" \
         r"Oct(?:ober)?|Nov(?:ember)?|Dec(?:ember)?)"
DATE = (rf"(?:\d{{4}}[-/.]\d{{1,2}}[-/.]\d{{1,2}}|\d{{4}}年\d{{1,2}}月(?:\d{{1,2}}日)?"
        rf"|\d{{1,2}}[-/.]\d{{1,2}}[-/.]\d{{2,4}}|\d{{1,2}}(?:st|nd|rd|th)?\s+{MONTHS}\.?,?\s+\d{{4}}|{MONTHS}\.?\s+\d{{1,2}}(?:st|nd|rd|th)?,?\s+\d{{4}})")
MRN_ID = r"[A-Za-z]{0,4}-?\d{5,12}"
ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
ID_CHECK_CHARS = "10X98765432"


def _word_list(filename: str) -> tuple[str, ...]:
    """The entries of a data file: one a line, '#' starts a comment line."""
    lines = (DATA / filename).read_text(encoding="utf-8").splitlines()
    return tuple(line.strip() for line in lines if line.strip() and not line.startswith("#"))


@cache
def chinese_surnames() -> tuple[str, ...]:
    """Common Chinese surnames, the two-character ones first (so an alternation tries them first)."""
    return tuple(sorted(_word_list("chinese_surnames.txt"), key=len, reverse=True))


@cache
def english_first_names() -> frozenset[str]:
    return frozenset(_word_list("english_first_names.txt"))


@cache
def english_surnames() -> frozenset[str]:
    return frozenset(_word_list("english_surnames.txt"))


def surname_alternation() -> str:
    """A regular expression (RE2 and Python alike) matching one surname of the list."""
    names = chinese_surnames()
    compound = "|".join(name for name in names if len(name) > 1)
    single = "".join(name for name in names if len(name) == 1)
    return f"(?:{compound}|[{single}])"


def first_name_alternation() -> str:
    return "(?:" + "|".join(sorted(english_first_names(), key=len, reverse=True)) + ")"


def surname_latin_alternation() -> str:
    return "(?:" + "|".join(sorted((re.escape(n) for n in english_surnames()), key=len, reverse=True)) + ")"


def prc_id_check_char(first17: str) -> str:
    """The ISO 7064 MOD 11-2 check character of a PRC resident identity number's first 17 digits."""
    total = sum(int(digit) * weight for digit, weight in zip(first17, ID_WEIGHTS, strict=True))
    return ID_CHECK_CHARS[total % 11]


def _real_date(year: int, month: int, day: int) -> bool:
    return 1 <= month <= 12 and 1 <= day <= calendar.monthrange(year, month)[1]


def valid_prc_id(text: str) -> bool:
    """Whether `text` is an 18-digit resident identity number with a real birth date and the right check
    digit, or a 15-digit legacy number (1984-1999, no check digit) with a real birth date in the 1900s."""
    if len(text) == 18 and text[:17].isdigit():
        year, month, day = int(text[6:10]), int(text[10:12]), int(text[12:14])
        return (1900 <= year <= 2099 and _real_date(year, month, day)
                and prc_id_check_char(text[:17]) == text[17].upper())
    if len(text) == 15 and text.isdigit():
        return _real_date(1900 + int(text[6:8]), int(text[8:10]), int(text[10:12]))
    return False


def _given_name(characters: str) -> bool:
    return all("\u4e00" <= c <= "\u9fff" and c not in NOT_GIVEN_NAME for c in characters)


def _not_surname(word: str) -> bool:
    """A capitalised word that ends a name rather than being its last part ("Lane" is both: a listed surname)."""
    return word in NOT_SURNAME and word not in english_surnames()


def is_bare_name(value: str, *, single_word: bool = False) -> bool:
    """Whether a whole cell value is a personal name by itself ("张伟", "欧阳娜娜", "John Smith", "Smith, John"),
    or, with `single_word`, a lone listed first name or surname ("Smith")."""
    value = value.strip()
    if not value:
        return False
    if "\u4e00" <= value[0] <= "\u9fff":
        for surname in chinese_surnames():
            if value.startswith(surname) and 1 <= len(value) - len(surname) <= 2:
                return _given_name(value[len(surname):])
        return False
    words = value.replace(",", " , ").split()
    if single_word and len(words) == 1:
        return words[0] in english_first_names() or words[0] in english_surnames()
    if len(words) == 3 and words[1] == ",":
        return words[0] in english_surnames() and words[2] in english_first_names()
    if 2 <= len(words) <= 3 and words[0] in english_first_names():
        return all(re.fullmatch(LATIN_WORD + r"|[A-Z]\.", w) for w in words[1:]) and not _not_surname(words[-1])
    return False


STREET_TYPES = r"(?:Street|St|Road|Rd|Avenue|Ave|Lane|Ln|Drive|Dr|Boulevard|Blvd|Way|Court|Ct|Place|Pl|Terrace|" \
               r"Close|Crescent|Square|Sq)"
US_STATES = _words("AL AK AZ AR CA CO CT DE FL GA HI ID IL IN IA KS KY LA ME MD MA MI MN MS MO MT NE NV NH NJ NM "
                   "NY NC ND OH OK OR PA RI SC SD TN TX UT VT VA WA WV WI WY DC")


def is_bare_date(value: str) -> bool:
    return re.fullmatch(DATE, value.strip()) is not None


def is_bare_record_number(value: str) -> bool:
    return re.fullmatch(MRN_ID, value.strip()) is not None
