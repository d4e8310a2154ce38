"""A seeded corpus of realistic clinical tables with known direct identifiers, for the de-identification scan.

`clinical_table(rows, seed)` returns a table and its truth: for each (column, kind), the rows that hold at least
one seeded identifier of that kind. Clean columns carry the words a careless scanner flags: surname characters
inside clinical words (高血压, 扩张, 周期性, 黄疸), eponyms (Parkinson disease, Addison disease), ICD-10 codes, lab
values, dates of visits, 11-digit accession numbers, pseudonymous patient ids (P000123), and identity numbers
whose check digit is wrong (which are not identifiers).
"""

# Clinical Chinese is written with full-width punctuation (commas, colons, brackets), which the text keeps.
# ruff: noqa: RUF001

from __future__ import annotations

import datetime
import random
from collections import defaultdict
from dataclasses import dataclass, field

import pyarrow as pa

from sandbox.catalog import identifier_patterns as recognizers

GIVEN_CHARACTERS = ("伟芳娜敏静丽强磊军洋勇艳杰娟涛明超秀霞平刚桂英华玉兰红建国文海燕萍辉鹏飞宇浩婷雪琳晶欣佳怡思子晨"
                    "梓涵轩博一诺雨泽睿嘉琪悦彤雅俊峰志豪")
LATIN_SURNAMES_OUTSIDE_LISTS = ("Featherstone", "Abernathy", "Quilliam", "Okafor-Reid", "Lindgren")
ROADS = ("建国", "中山", "人民", "解放", "淮海", "南京西", "漕溪北", "长安", "和平", "复兴中")
CITIES = (("北京", "朝阳"), ("上海", "徐汇"), ("广州", "天河"), ("成都", "武侯"), ("杭州", "西湖"))
EN_STREETS = ("Oak", "Maple", "Church", "Victoria", "High", "Mill", "Station", "Queen Anne")
STREET_TYPES = ("Street", "Road", "Avenue", "Lane", "Drive", "St", "Rd", "Ave")
DOMAINS = ("example.org", "mail.example.com", "hospital.example.cn", "163.com", "qq.com")
AREA_CODES = ("110105", "310104", "440106", "510107", "330106")

DIAGNOSES_CN = ("高血压", "2型糖尿病", "冠心病", "支气管扩张", "周围神经病变", "房颤", "白内障",
                "慢性阻塞性肺疾病", "急性心肌梗死", "脑梗死", "肺炎", "帕金森病", "库欣综合征", "霍奇金淋巴瘤",
                "唐氏综合征", "甲状腺功能亢进",
                "胃食管反流病", "贫血", "痛风", "骨质疏松", "周期性麻痹", "白血病", "黄疸", "石淋", "毛囊炎", "高血脂")
DIAGNOSES_EN = ("Parkinson disease", "Cushing syndrome", "Hodgkin lymphoma", "Down syndrome",
                "Type 2 diabetes mellitus", "Essential hypertension", "Graves disease", "Crohn disease", "Bell palsy",
                "Addison disease",
                "Alzheimer disease", "Barrett oesophagus", "Guillain-Barre syndrome", "Marfan syndrome",
                "Huntington disease", "Christmas disease", "Wilson disease", "Paget disease of bone", "Ewing sarcoma",
                "Kaposi sarcoma", "Grace Hospital referral")
ICD10 = ("I65.2", "E11.9", "I10", "J44.1", "C81.9", "G20", "E24.9", "Q90.9", "I48.0", "H25.9", "N20.0", "K21.0")
SITES = ("北京协和医院", "上海瑞金医院", "华西医院", "Royal London", "Manchester Royal Infirmary", "St Thomas'")
CLEAN_NOTES_CN = (
    "患者于今日入院，既往高血压病史10年，规律服药。",
    "患者高血压病史5年，血压控制可，复查 2024-01-15。",
    "胸部CT示支气管扩张，肺功能 FEV1 65%。",
    "患者周期性发热3天，体温最高39.2℃，血常规白细胞 12.5×10^9/L。",
    "值班医生查房后，予补液对症处理。",
    "主治医师查房，患者一般情况可，双下肢无水肿。",
    "患者王某，诊断冠心病，建议随访3个月。",
    "血管扩张剂已停用，心率 72 次/分，血压 130/85 mmHg。",
    "标本号 20240012345，HbA1c 7.2%，LDL 3.1 mmol/L。",
    "患者家属表示理解，签署知情同意书。",
    "患者查体：神志清，精神可，黄疸（-）。",
    "患者常规复查，阴性，ICD-10 I65.2。",
)
CLEAN_NOTES_EN = (
    "Patient reports improved mobility; Parkinson disease stable on levodopa.",
    "Known Cushing syndrome, follow up in 3 months. BP 128/82 mmHg.",
    "Hodgkin lymphoma in remission since 2019-06-01; PET negative.",
    "Down syndrome with congenital heart disease, reviewed in clinic on 2023-04-05.",
    "HbA1c 7.2%, eGFR 65 ml/min/1.73m2, LDL 3.1 mmol/L.",
    "Addison disease on hydrocortisone 20 mg daily; Ward 5 bed 12.",
    "Patient Education leaflet given. Discussed Grace Hospital referral.",
    "Accession 20240012345 received; ICD-10 I65.2, E11.9.",
    "Seen with Bell palsy, Graves disease and Crohn disease history.",
    "Type 2 diabetes mellitus, started metformin 500 mg twice daily.",
)


@dataclass
class Corpus:
    """A table and, per (column, kind), the rows seeded with that kind of identifier."""

    table: pa.Table
    truth: dict[tuple[str, str], set[int]] = field(default_factory=dict)
    seeded_values: list[str] = field(default_factory=list)
    clean_columns: tuple[str, ...] = ()


def valid_id(rng: random.Random, *, year: int | None = None) -> str:
    """An 18-digit resident identity number with a real birth date and a right check digit."""
    birth = datetime.date(year or rng.randint(1930, 2015), rng.randint(1, 12), rng.randint(1, 28))
    first17 = f"{rng.choice(AREA_CODES)}{birth:%Y%m%d}{rng.randint(0, 999):03d}"
    return first17 + recognizers.prc_id_check_char(first17)


def invalid_id(rng: random.Random) -> str:
    """Like `valid_id`, but with a wrong check digit: random digits, not an identity number."""
    real = valid_id(rng)
    wrong = rng.choice([c for c in "0123456789X" if c != real[-1]])
    return real[:17] + wrong


def chinese_name(rng: random.Random) -> str:
    surname = rng.choice(recognizers.chinese_surnames())
    return surname + "".join(rng.choice(GIVEN_CHARACTERS) for _ in range(rng.choice((1, 2))))


def latin_name(rng: random.Random) -> str:
    first, last = sorted(recognizers.english_first_names()), sorted(recognizers.english_surnames())
    return f"{rng.choice(first)} {rng.choice(last)}"


def mobile(rng: random.Random) -> str:
    digits = f"1{rng.choice('3456789')}{rng.randint(0, 9)}{rng.randint(0, 99_999_999):08d}"
    style = rng.randrange(4)
    if style == 0:
        return digits
    if style == 1:
        return f"{digits[:3]}-{digits[3:7]}-{digits[7:]}"
    if style == 2:
        return f"+86 {digits[:3]} {digits[3:7]} {digits[7:]}"
    return f"+86-{digits}"


def phone(rng: random.Random) -> str:
    """A phone number in one of the formats a note holds: PRC mobile or landline, US or UK."""
    style = rng.randrange(6)
    if style <= 1:
        return mobile(rng)
    if style == 2:
        return rng.choice((f"010-{rng.randint(6_000_0000, 8_999_9999)}", f"(021){rng.randint(5_000_0000, 6_999_9999)}",
                           f"0571-{rng.randint(8_000_0000, 8_999_9999)}"))
    if style == 3:
        return rng.choice(("+1 (617) 253-1000", "617-253-1000", "(212) 555-0187", "+1 415 555 0132"))
    if style == 4:
        return rng.choice(("020 7946 0958", "+44 20 7946 0123", "0161 496 0735"))
    return mobile(rng)


def email(rng: random.Random) -> str:
    local = rng.choice(("j.smith", "wang.wei", "li_na88", "patient.contact", "m.okafor", "zhangsan2020"))
    return f"{local}{rng.randint(1, 999)}@{rng.choice(DOMAINS)}"


def address(rng: random.Random, *, chinese: bool) -> str:
    if chinese:
        city, district = rng.choice(CITIES)
        suffix = rng.choice(("", f"{rng.randint(1, 30)}号楼{rng.randint(101, 2505)}室", f"{rng.randint(1, 9)}单元"))
        return f"{city}市{district}区{rng.choice(ROADS)}路{rng.randint(1, 999)}号{suffix}"
    style = rng.randrange(3)
    if style == 0:
        return f"{rng.randint(1, 999)} {rng.choice(EN_STREETS)} {rng.choice(STREET_TYPES)}"
    if style == 1:
        return f"{rng.randint(1, 99)} {rng.choice(EN_STREETS)} {rng.choice(STREET_TYPES)}, London SW1A 1AA"
    return f"{rng.randint(1, 999)} {rng.choice(EN_STREETS)} {rng.choice(STREET_TYPES)}, Boston MA 02115"


def record_number(rng: random.Random) -> str:
    return rng.choice(("ZY", "MZ", "", "H")) + f"{rng.randint(0, 99_999_999):08d}"


def birth_date_text(rng: random.Random, *, chinese: bool) -> str:
    born = datetime.date(rng.randint(1930, 2015), rng.randint(1, 12), rng.randint(1, 28))
    if chinese:
        return rng.choice((f"{born.year}年{born.month}月{born.day}日", f"{born:%Y-%m-%d}"))
    return rng.choice((f"{born:%d/%m/%Y}", f"{born:%Y-%m-%d}", f"{born.day} {born:%B} {born.year}",
                       f"{born:%b} {born.day}, {born.year}"))


def seeded_note_cn(rng: random.Random) -> tuple[str, set[str], list[str]]:
    """A Chinese note with one to three seeded identifiers: (text, kinds, identifiers)."""
    parts, kinds, values = [], set(), []
    for kind in rng.sample(("person_name", "national_id", "phone", "address", "medical_record_number",
                            "date_of_birth", "email"), rng.randint(1, 3)):
        if kind == "person_name":
            name = chinese_name(rng)
            text = rng.choice((f"患者{name}，男，{rng.randint(18, 90)}岁，因胸痛入院。", f"姓名：{name}。",
                               f"家属：{name}（女儿）。", f"联系人{name}，", f"主治医生：{name}。",
                               f"{name}先生今日复诊。", f"由{name}医生查房。"))
        elif kind == "national_id":
            name = valid_id(rng)
            text = rng.choice((f"身份证号{name}。", f"身份证：{name}，", f"证件号码 {name}；"))
        elif kind == "phone":
            name = phone(rng)
            text = rng.choice((f"联系电话：{name}。", f"手机 {name}，", f"电话{name}；"))
        elif kind == "address":
            name = address(rng, chinese=True)
            text = rng.choice((f"住址：{name}。", f"现住{name}，", f"家庭地址 {name}；"))
        elif kind == "medical_record_number":
            name = record_number(rng)
            text = rng.choice((f"病历号：{name}。", f"住院号{name}，", f"门诊号 {name}；"))
        elif kind == "date_of_birth":
            name = birth_date_text(rng, chinese=True)
            text = rng.choice((f"出生日期：{name}。", f"生于{name}，", f"出生日期 {name}；"))
        else:
            name = email(rng)
            text = f"邮箱 {name}。"
        parts.append(text)
        kinds.add(kind)
        values.append(name)
    parts.append(rng.choice(CLEAN_NOTES_CN))
    rng.shuffle(parts)
    return "".join(parts), kinds, values


def seeded_note_en(rng: random.Random) -> tuple[str, set[str], list[str]]:
    """An English note with one to three seeded identifiers: (text, kinds, identifiers)."""
    parts, kinds, values = [], set(), []
    for kind in rng.sample(("person_name", "phone", "email", "address", "medical_record_number", "date_of_birth",
                            "national_id"), rng.randint(1, 3)):
        if kind == "person_name":
            name = latin_name(rng)
            surname = name.split()[1]
            text = rng.choice((f"Patient {name} attended clinic.", f"Name: {name}.", f"Seen by Dr. {surname}.",
                               f"Mrs {rng.choice(LATIN_SURNAMES_OUTSIDE_LISTS)} called the ward.",
                               f"{name} reports chest pain.", f"{surname}, {name.split()[0]} - follow up.",
                               f"Next of kin: {name}."))
            name = text  # the note line carries the name; masked examples are checked against it
        elif kind == "phone":
            name = phone(rng)
            text = rng.choice((f"Tel {name}.", f"Contact number {name}.", f"Mobile: {name}."))
        elif kind == "email":
            name = email(rng)
            text = rng.choice((f"Email {name}.", f"Contact via {name}."))
        elif kind == "address":
            name = address(rng, chinese=False)
            text = rng.choice((f"Lives at {name}.", f"Address: {name}."))
        elif kind == "medical_record_number":
            name = record_number(rng)
            text = rng.choice((f"MRN: {name}.", f"Medical record number {name}.", f"MRN {name}."))
        elif kind == "date_of_birth":
            name = birth_date_text(rng, chinese=False)
            text = rng.choice((f"DOB {name}.", f"Date of birth: {name}.", f"D.O.B. {name}.", f"Born on {name}."))
        else:
            name = valid_id(rng)
            text = f"PRC ID card {name}."
        parts.append(text)
        kinds.add(kind)
        values.append(name)
    parts.append(rng.choice(CLEAN_NOTES_EN))
    rng.shuffle(parts)
    return " ".join(parts), kinds, values


def clinical_table(rows: int = 2000, *, seed: int = 16, seeded_share: float = 0.3) -> Corpus:
    """A clinical table of `rows` rows with seeded direct identifiers in its notes and identifier columns."""
    rng = random.Random(seed)
    truth: dict[tuple[str, str], set[int]] = defaultdict(set)
    seeded_values: list[str] = []
    columns: dict[str, list[object]] = defaultdict(list)
    for row in range(rows):
        columns["patient_id"].append(f"P{row:06d}")
        columns["age"].append(rng.randint(18, 95))
        columns["sex"].append(rng.choice(("M", "F")))
        columns["site"].append(rng.choice(SITES))
        columns["diagnosis_cn"].append(rng.choice(DIAGNOSES_CN))
        columns["diagnosis_en"].append(rng.choice(DIAGNOSES_EN))
        columns["icd10"].append(rng.choice(ICD10))
        columns["hba1c"].append(round(rng.uniform(4.5, 12.0), 1))
        columns["accession"].append(f"2024{rng.randint(0, 9_999_999):07d}")  # 11 digits, not a phone
        columns["specimen_no"].append(20_230_000_000 + row)  # an 11-digit integer, not a phone
        columns["visit_date"].append(datetime.date(2023, 1, 1) + datetime.timedelta(days=rng.randint(0, 700)))
        # Identifier columns a steward forgot to drop.
        columns["patient_name"].append(chinese_name(rng) if rng.random() < 0.7 else latin_name(rng))
        truth[("patient_name", "person_name")].add(row)
        if rng.random() < 0.8:
            columns["id_number"].append(valid_id(rng))
            truth[("id_number", "national_id")].add(row)
        else:
            columns["id_number"].append(invalid_id(rng))  # a typo'd number: random digits, no identifier
        columns["mobile"].append(int(mobile(rng).replace("+86", "").replace(" ", "").replace("-", "")))
        truth[("mobile", "phone")].add(row)
        columns["birth_date"].append(datetime.date(rng.randint(1930, 2015), rng.randint(1, 12), rng.randint(1, 28)))
        truth[("birth_date", "date_of_birth")].add(row)
        columns["mrn"].append(record_number(rng))
        truth[("mrn", "medical_record_number")].add(row)
        seeded_values.extend(str(columns[name][-1]) for name in ("patient_name", "id_number", "mobile", "mrn"))
        for column, make, clean in (("notes_cn", seeded_note_cn, CLEAN_NOTES_CN),
                                    ("notes_en", seeded_note_en, CLEAN_NOTES_EN)):
            if rng.random() < seeded_share:
                text, kinds, values = make(rng)
                for kind in kinds:
                    truth[(column, kind)].add(row)
                seeded_values.extend(values)
            elif rng.random() < 0.1:
                # An identity number with a wrong check digit, beside the words that introduce one.
                text = rng.choice(clean) + (f"身份证号{invalid_id(rng)}。" if column == "notes_cn"
                                            else f" ID card {invalid_id(rng)}.")
            else:
                text = rng.choice(clean)
            columns[column].append(text)
    table = pa.table(dict(columns))
    clean_columns = ("patient_id", "sex", "site", "diagnosis_cn", "diagnosis_en", "icd10", "accession", "specimen_no",
                     "visit_date", "age", "hba1c")
    return Corpus(table=table, truth=dict(truth), seeded_values=seeded_values, clean_columns=clean_columns)
