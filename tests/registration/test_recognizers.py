"""Each offline recognizer finds what it names and leaves alone what only looks like it."""

# Clinical Chinese is written with full-width punctuation (commas, colons, brackets), which the text keeps.
# ruff: noqa: RUF001

from __future__ import annotations

import random

import pytest
from deid_corpus import invalid_id, valid_id

from sandbox.catalog import identifier_patterns as patterns
from sandbox.catalog import recognizers as r


def found(recognizer: object, text: str) -> list[str]:
    """The substrings `recognizer` reports in `text`."""
    results = recognizer.analyze(text, recognizer.supported_entities, None)  # type: ignore[attr-defined]
    return [text[result.start:result.end] for result in results]


# --- PRC resident identity numbers ----------------------------------------------------------------------------

def test_check_digit_follows_iso_7064_mod_11_2() -> None:
    # The worked example of GB 11643-1999: 11010519491231002 has check character X.
    assert patterns.prc_id_check_char("11010519491231002") == "X"
    assert patterns.valid_prc_id("11010519491231002X")
    assert patterns.valid_prc_id("11010519491231002x"), "a lower-case x is the same check character"
    assert not patterns.valid_prc_id("110105194912310021"), "a wrong check digit passed"


def test_every_wrong_check_digit_is_refused_and_the_right_one_kept() -> None:
    rng = random.Random(7)
    for _ in range(200):
        number = valid_id(rng)
        assert patterns.valid_prc_id(number), f"a generated valid number {number} failed"
        for wrong in "0123456789X":
            if wrong != number[-1]:
                assert not patterns.valid_prc_id(number[:17] + wrong), \
                    f"{number[:17] + wrong} passed with a wrong check digit"


def test_birth_date_part_must_be_a_real_date() -> None:
    for first17 in ("11010519490230002", "11010519491331002", "11010519490000002", "11010521000101002"):
        number = first17 + patterns.prc_id_check_char(first17)
        assert not patterns.valid_prc_id(number), f"{number} has no real birth date but passed"
    leap = "11010520000229002"
    assert patterns.valid_prc_id(leap + patterns.prc_id_check_char(leap)), "29 February 2000 is a real date"


def test_id_recognizer_in_text() -> None:
    recognizer = r.PrcResidentIdRecognizer()
    rng = random.Random(3)
    number, wrong = valid_id(rng), invalid_id(rng)
    assert found(recognizer, f"身份证号{number}，男") == [number]
    assert found(recognizer, f"身份证号{wrong}，男") == [], "a wrong check digit counted as an identity number"
    assert found(recognizer, f"order 9{number}1") == [], "digits inside a longer number counted"
    assert found(recognizer, "specimen 110105491231002 received") == [], "15 digits without ID context counted"
    assert found(recognizer, "身份证 110105491231002") == ["110105491231002"], "a legacy 15-digit number was missed"


# --- names ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("text", "expected"), [
    ("患者张伟，男，45岁", ["张伟"]),
    ("患者欧阳娜娜因胸痛入院", ["欧阳娜娜"]),
    ("姓名：李明", ["李明"]),
    ("家属：王芳（女儿）", ["王芳"]),
    ("由刘医生查房", ["刘"]),
    ("陈建国先生今日复诊", ["陈建国"]),
])
def test_chinese_names_found(text: str, expected: list[str]) -> None:
    assert found(r.ChineseNameRecognizer(), text) == expected


@pytest.mark.parametrize("text", [
    "患者高血压病史10年", "胸部CT示支气管扩张", "血管扩张剂已停用", "患者周期性发热3天", "患者于今日入院",
    "值班医生查房后予补液", "患者王某，诊断冠心病", "患者查体：神志清", "患者常规复查，阴性", "主任医师查房",
    "全科医生随访", "黄疸（-）", "白血病化疗后", "患者易疲劳。", "患者江西人。",
])
def test_surname_characters_inside_clinical_words_are_not_names(text: str) -> None:
    assert found(r.ChineseNameRecognizer(), text) == [], f"a name was found in {text!r}"


@pytest.mark.parametrize(("text", "expected"), [
    ("Patient John Smith attended", ["John Smith"]),
    ("Seen by Dr. Okonkwo today", ["Okonkwo"]),
    ("Mrs Featherstone called", ["Featherstone"]),
    ("Name: Mary Jones.", ["Mary Jones"]),
    ("Smith, John - follow up", ["Smith, John"]),
    ("Next of kin: Scott O'Brien", ["Scott O'Brien"]),
    ("Christine McDonald reports pain", ["Christine McDonald"]),
])
def test_latin_names_found(text: str, expected: list[str]) -> None:
    assert found(r.LatinNameRecognizer(), text) == expected


@pytest.mark.parametrize("text", [
    "Parkinson disease, Cushing syndrome, Hodgkin lymphoma, Down syndrome", "Addison Disease on hydrocortisone",
    "Discussed Grace Hospital referral", "Patient Education leaflet given", "Lives at 12 Victoria Lane",
    "patient reports improved mobility", "Graves disease and Crohn disease", "MS relapse, Bell palsy",
])
def test_eponyms_and_clinical_phrases_are_not_names(text: str) -> None:
    assert found(r.LatinNameRecognizer(), text) == [], f"a name was found in {text!r}"


def test_bare_names() -> None:
    for name in ("张伟", "欧阳娜娜", "John Smith", "Smith, John", "Mary J. Jones"):
        assert patterns.is_bare_name(name), f"{name!r} is a name"
    for value in ("高血压", "阴性", "白内障", "Parkinson disease", "Essential hypertension", "Smith", "John"):
        assert not patterns.is_bare_name(value), f"{value!r} is not a name on its own"
    assert patterns.is_bare_name("Smith", single_word=True), "a lone listed surname is a name in a name column"


# --- phones, email, addresses, record numbers, dates of birth --------------------------------------------------

@pytest.mark.parametrize("number", ["13812345678", "138-1234-5678", "+86 138 1234 5678", "+86-13812345678",
                                    "010-62345678", "(021)64041990"])
def test_prc_phones(number: str) -> None:
    assert found(r.PrcPhoneRecognizer(), f"联系电话：{number}。") == [number]


@pytest.mark.parametrize("number", ["+1 (617) 253-1000", "617-253-1000", "020 7946 0958", "+44 20 7946 0123"])
def test_international_phones(number: str) -> None:
    assert found(r.international_phone_recognizer(), f"Tel {number}.") == [number]


@pytest.mark.parametrize("text", ["HbA1c 7.2%, BP 130/85 mmHg, 2023-04-05", "标本号 20240012345", "I65.2 E11.9",
                                  "WBC 6.5 x10^9/L", "身份证号110105194912310021", "specimen 202312150045"])
def test_clinical_numbers_are_not_phones(text: str) -> None:
    assert found(r.PrcPhoneRecognizer(), text) == []
    assert found(r.international_phone_recognizer(), text) == []


def test_email() -> None:
    recognizer = r.OfflineEmailRecognizer()
    assert found(recognizer, "Email j.smith42@mail.example.com.") == ["j.smith42@mail.example.com"]
    assert found(recognizer, "邮箱 li_na88@163.com。") == ["li_na88@163.com"]
    assert found(recognizer, "dose 5 mg @ 08:00; ratio a@b") == []


@pytest.mark.parametrize(("text", "expected"), [
    ("住址：北京市朝阳区建国路88号", "北京市朝阳区建国路88号"),
    ("上海市徐汇区漕溪北路100弄5号201室", "上海市徐汇区漕溪北路100弄5号201室"),
    ("Lives at 12 Oak Street.", "12 Oak Street"),
    ("Address: 8 Queen Anne Rd, London SW1A 1AA", "SW1A 1AA"),
    ("Boston MA 02115", "MA 02115"),
])
def test_addresses(text: str, expected: str) -> None:
    assert any(expected in hit for hit in found(r.AddressRecognizer(), text)), f"{expected!r} missed in {text!r}"


@pytest.mark.parametrize("text", ["胸部CT示支气管扩张", "随访3个月，5号病房", "Ward 5 bed 12", "T2 N0 M0 stage",
                                  "follow up in 3 months", "ICD-10 I65.2"])
def test_clinical_text_is_not_an_address(text: str) -> None:
    assert found(r.AddressRecognizer(), text) == []


def test_medical_record_numbers() -> None:
    recognizer = r.MedicalRecordNumberRecognizer()
    assert found(recognizer, "MRN: 00123456.") == ["00123456"]
    assert found(recognizer, "病历号：ZY20231234，") == ["ZY20231234"]
    assert found(recognizer, "住院号1234567入院") == ["1234567"]
    assert found(recognizer, "Medical record number 12345678") == ["12345678"]
    assert found(recognizer, "patient P000123, ward 12345") == [], "a pseudonym without MRN context counted"


def test_dates_of_birth() -> None:
    recognizer = r.DateOfBirthRecognizer()
    assert found(recognizer, "DOB 03/12/1985.") == ["03/12/1985"]
    assert found(recognizer, "出生日期：1985年3月12日，") == ["1985年3月12日"]
    assert found(recognizer, "Born on 3 March 1985") == ["3 March 1985"]
    assert found(recognizer, "Date of birth: Mar 3, 1985") == ["Mar 3, 1985"]
    assert found(recognizer, "生于1978-11-02") == ["1978-11-02"]
    assert found(recognizer, "admitted 2023-04-05, discharged 2023-04-09") == [], "a visit date counted as a birth"


def test_class_names_do_not_shadow_presidio_recognizers() -> None:
    """presidio's registry finds predefined recognizer classes by name: a namesake here would replace one."""
    import inspect

    from presidio_analyzer import EntityRecognizer, predefined_recognizers

    ours = {name for name, cls in inspect.getmembers(r, inspect.isclass)
            if issubclass(cls, EntityRecognizer) and cls.__module__ == r.__name__}
    assert ours, "no recognizer classes found"
    assert not ours & set(dir(predefined_recognizers)), f"shadowing presidio: {ours & set(dir(predefined_recognizers))}"
