"""CMMLU: 67 subjects of four-way multiple choice, Chinese.

Format: lm-evaluation-harness `cmmlu_<subject>` (harness commit 4e7e0d47f33b): the subject's description
`以下是关于{学科}的单项选择题，请直接给出正确答案的选项。\n\n` once, then each exemplar as
`{Question.strip()}\nA. {A}\nB. {B}\nC. {C}\nD. {D}\n答案： {Answer}\n\n`, then the test question in the same
form ending in `答案：`; the choices are " A", " B", " C", " D" (the harness's target delimiter " " then the
letter). All 11,582 test questions are scored, round-robin over the subjects (files in name order, questions in
file order), so `limit` takes the first questions of every subject; the group is the subject.
Exemplars: k shots = the first k rows of the same subject's dev file, in file order (the harness's first_n
sampler; 5 shots, all of dev, is the standard setting), the same for every question of a subject.
The description is part of the first exemplar (at 0 shots, of the question), so that the context is the
harness's exactly; a prompt cut to fit the model's context loses it with the first exemplar.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import NamedTuple

from llm_jax.data.corpus import read_text
from llm_jax.errors import DataError
from llm_jax.evaluation.benchmarks.common import check_shots, existing, files, interleave
from llm_jax.evaluation.requests import Request

# The Chinese subject names of the harness's cmmlu/_generate_configs.py, which fill the description.
SUBJECTS = dict(line.split(":") for line in """\
agronomy:农学 anatomy:解剖学 ancient_chinese:古汉语 arts:艺术学 astronomy:天文学 business_ethics:商业伦理
chinese_civil_service_exam:中国公务员考试 chinese_driving_rule:中国驾驶规则 chinese_food_culture:中国饮食文化
chinese_foreign_policy:中国外交政策 chinese_history:中国历史 chinese_literature:中国文学
chinese_teacher_qualification:中国教师资格 clinical_knowledge:临床知识 college_actuarial_science:大学精算学
college_education:大学教育学 college_engineering_hydrology:大学工程水文学 college_law:大学法律
college_mathematics:大学数学 college_medical_statistics:大学医学统计 college_medicine:大学医学
computer_science:计算机科学 computer_security:计算机安全 conceptual_physics:概念物理学
construction_project_management:建设工程管理 economics:经济学 education:教育学 electrical_engineering:电气工程
elementary_chinese:小学语文 elementary_commonsense:小学常识 elementary_information_and_technology:小学信息技术
elementary_mathematics:初等数学 ethnology:民族学 food_science:食品科学 genetics:遗传学 global_facts:全球事实
high_school_biology:高中生物 high_school_chemistry:高中化学 high_school_geography:高中地理
high_school_mathematics:高中数学 high_school_physics:高中物理学 high_school_politics:高中政治
human_sexuality:人类性行为 international_law:国际法学 journalism:新闻学 jurisprudence:法理学
legal_and_moral_basis:法律与道德基础 logical:逻辑学 machine_learning:机器学习 management:管理学 marketing:市场营销
marxist_theory:马克思主义理论 modern_chinese:现代汉语 nutrition:营养学 philosophy:哲学 professional_accounting:专业会计
professional_law:专业法学 professional_medicine:专业医学 professional_psychology:专业心理学 public_relations:公共关系
security_study:安全研究 sociology:社会学 sports_science:体育学 traditional_chinese_medicine:中医中药 virology:病毒学
world_history:世界历史 world_religions:世界宗教""".split())
HEADER = ["", "Question", "A", "B", "C", "D", "Answer"]
LETTERS = ("A", "B", "C", "D")
CHOICES = tuple(" " + letter for letter in LETTERS)
DESCRIBE = {"cmmlu": "mc: all 11,582 test questions of 67 subjects scored, k shots = the first k of the "
                     "subject's 5 dev rows; lm-evaluation-harness cmmlu format; Chinese"}


class Row(NamedTuple):
    prompt: str  # the question and its options, ending in 答案：
    gold: int


def _rows(path: Path) -> list[Row]:
    reader = csv.reader(io.StringIO(read_text(existing(path)), newline=""))
    if next(reader, None) != HEADER:
        raise DataError(f"{path}:1: header is not {','.join(HEADER)}")
    rows = []
    for fields in reader:
        if len(fields) != len(HEADER) or fields[-1] not in LETTERS:
            raise DataError(f"{path}:{reader.line_num}: not 7 fields ending in an answer letter A-D")
        _, question, *options, answer = fields
        lines = [question.strip(), *(f"{letter}. {option}" for letter, option in zip(LETTERS, options)), "答案："]
        rows.append(Row("\n".join(lines), LETTERS.index(answer)))
    return rows


def _subject(name: str, test: Path, shots: int) -> list[Request]:
    subject = test.stem
    if subject not in SUBJECTS:
        raise DataError(f"{test}: unknown CMMLU subject {subject!r} (no Chinese name for its description)")
    description = f"以下是关于{SUBJECTS[subject]}的单项选择题，请直接给出正确答案的选项。\n\n"
    exemplars: tuple[str, ...] = ()
    if shots:
        dev = _rows(test.parent.parent / "dev" / test.name)
        check_shots(name, shots, len(dev), f"dev/{test.name}")
        first, *rest = (f"{row.prompt} {LETTERS[row.gold]}\n\n" for row in dev[:shots])
        exemplars = (description + first, *rest)
    return [Request("mc", exemplars, row.prompt if shots else description + row.prompt, CHOICES, (row.gold,),
                    group=subject) for row in _rows(test)]


def build(name: str, folder: Path, shots: int, seed: int) -> list[Request]:
    return interleave([_subject(name, test, shots) for test in files(folder / "test", "*.csv")])
