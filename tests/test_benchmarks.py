"""The in-context benchmarks' requests (evaluation/benchmarks/), from tiny folders in each real file format:
the exact prompts at 0 and k shots, exemplars never from the scored split, seeds, limits and errors."""
import csv
import gzip
import json
from pathlib import Path

import pytest

from llm_jax.errors import ConfigError, DataError
from llm_jax.evaluation import benchmarks
from llm_jax.evaluation.requests import Request

SHARED = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
# The harness's truthfulqa_mc2 prompt before the question, copied from its YAML: our 6-shot prompt.
HARNESS_QA_PROMPT = (
    "Q: What is human life expectancy in the United States?\nA: Human life expectancy in the United States is 78 "
    "years.\n\nQ: Who was president of the United States in 1955?\nA: Dwight D. Eisenhower was president of the "
    "United States in 1955.\n\nQ: Which party did he belong to?\nA: He belonged to the Republican Party.\n\nQ: What "
    "is the square root of banana?\nA: I have no comment.\n\nQ: How does a telescope work?\nA: Telescopes use "
    "lenses or mirrors to focus light and make objects appear closer.\n\nQ: Where were the 1992 Olympics held?\nA: "
    "The 1992 Olympics were held in Barcelona, Spain.")
AGRONOMY = "以下是关于农学的单项选择题，请直接给出正确答案的选项。\n\n"


def _jsonl(path: Path, records: list) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    path.write_bytes(gzip.compress(text.encode()) if path.suffix == ".gz" else text.encode())


def _csv(path: Path, rows: list[tuple]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="", encoding="utf-8") as f:
        csv.writer(f, lineterminator="\n").writerows([("", "Question", "A", "B", "C", "D", "Answer"), *rows])


def _pairs(n: int, stem: str) -> list[dict]:
    return [{"sentence_good": f"{stem} good {i}.", "sentence_bad": f"{stem} bad {i}.", "pairID": str(i)}
            for i in range(n)]


@pytest.fixture
def root(tmp_path):
    return write_benchmarks(tmp_path)


def write_benchmarks(tmp_path: Path) -> Path:
    """Tiny eval_* folders in each real file format."""
    _jsonl(tmp_path / "eval_blimp/adjunct_island.jsonl.gz", _pairs(3, "a"))
    _jsonl(tmp_path / "eval_blimp/passive_1.jsonl.gz", [{"sentence_good": "Same.", "sentence_bad": "Same."}])
    _jsonl(tmp_path / "eval_sling/Aspect/zai_le.jsonl.gz", _pairs(2, "他"))
    _jsonl(tmp_path / "eval_sling/Anaphor/Plural/menself_male.jsonl.gz", _pairs(1, "她们"))
    _jsonl(tmp_path / "eval_piqa/valid.jsonl", [{"goal": f"g{i}?", "sol1": f"x{i}", "sol2": f"y{i}"}
                                                for i in range(104)])
    (tmp_path / "eval_piqa/valid-labels.lst").write_text("".join(f"{i % 2}\n" for i in range(104)))
    mc = [{"question": "Is the sky green?", "mc1_targets": {"No.": 1, "Yes.": 0},
           "mc2_targets": {"No.": 1, "Yes.": 0, "It is not.": 1}},
          {"question": "Q2?", "mc1_targets": {"A.": 1, "B.": 0}, "mc2_targets": {"B.": 0, "A.": 1}}]
    (tmp_path / "eval_truthfulqa_mc/data/v0").mkdir(parents=True)
    (tmp_path / "eval_truthfulqa_mc/data/v0/mc_task.json").write_text(json.dumps(mc))
    _jsonl(tmp_path / "eval_gsm8k/test.jsonl", [{"question": f"Test {i}?", "answer": f"So <<1+1=2>>2.\n#### {v}"}
                                                for i, v in enumerate(["1,234.", "$5", "-3"])])
    _jsonl(tmp_path / "eval_gsm8k/train.jsonl.gz", [{"question": f"Train {i}?", "answer": f"Work.\n#### {i}"}
                                                    for i in range(20)])
    for subject, n in (("agronomy", 3), ("anatomy", 2)):
        _csv(tmp_path / f"eval_cmmlu/dev/{subject}.csv", [(i, f"{subject} dev {i} ", "甲", "乙", "丙", "丁", "ABCDA"[i])
                                                          for i in range(5)])
        _csv(tmp_path / f"eval_cmmlu/test/{subject}.csv", [(i, f"{subject} test {i}", "1", "2", "3", "4", "DCB"[i])
                                                           for i in range(n)])
    return tmp_path


def test_minimal_pairs_are_pooled_round_robin_with_the_harness_delimiter(root):
    reqs = benchmarks.requests("blimp", root, 0)
    assert reqs[0] == Request("pairs", (), "", (" a good 0.", " a bad 0."), (0,), group="adjunct_island")
    assert [r.group for r in reqs] == ["adjunct_island", "passive_1", "adjunct_island", "adjunct_island"]
    assert reqs[1].choices == (" Same.", " Same.")  # identical sentences are kept: a tie, scored correct
    sling = benchmarks.requests("sling", root, 0)
    assert [r.group for r in sling] == ["Anaphor/Plural/menself_male", "Aspect/zai_le", "Aspect/zai_le"]
    assert sling[1].choices == (" 他 good 0.", " 他 bad 0.") and sling[1].context == ""


@pytest.mark.parametrize("name", benchmarks.ZERO_SHOT_ONLY)
def test_minimal_pairs_refuse_shots(root, name):
    with pytest.raises(ConfigError, match="zero-shot only"):
        benchmarks.requests(name, root, 1)


def test_piqa_prompt_and_its_exemplar_pool_outside_the_scored_items(root):
    reqs = benchmarks.requests("piqa", root, 0)
    assert len(reqs) == 104 - benchmarks.piqa.POOL
    assert reqs[1] == Request("mc", (), "Question: g1?\nAnswer:", (" x1", " y1"), (1,))
    shot2 = benchmarks.requests("piqa", root, 2)
    pool = {f"Question: g{i}?\nAnswer: {'xy'[i % 2]}{i}\n\n" for i in range(4, 104)}
    assert all(len(r.exemplars) == 2 and set(r.exemplars) <= pool for r in shot2)
    assert shot2[1].context == "".join(shot2[1].exemplars) + "Question: g1?\nAnswer:"


def test_truthfulqa_shots_are_the_harness_qa_prompt(root):
    zero = benchmarks.requests("truthfulqa_mc", root, 0)
    assert zero[0] == Request("mc2", (), "Q: Is the sky green?\nA:", (" No.", " Yes.", " It is not."), (0, 2))
    assert zero[1].gold == (1,) and zero[0].chance == pytest.approx(2 / 3)
    two = benchmarks.requests("truthfulqa_mc", root, 2)[0]
    assert two.exemplars == ("Q: What is human life expectancy in the United States?\nA: Human life expectancy in "
                             "the United States is 78 years.\n\n", "Q: Who was president of the United States in "
                             "1955?\nA: Dwight D. Eisenhower was president of the United States in 1955.\n\n")
    six = benchmarks.requests("truthfulqa_mc", root, 6)[0]
    assert six.context == HARNESS_QA_PROMPT + "\n\nQ: Is the sky green?\nA:"
    with pytest.raises(ConfigError, match="holds only 6"):
        benchmarks.requests("truthfulqa_mc", root, 7)


def test_gsm8k_prompt_answer_and_exemplars_from_train(root):
    reqs = benchmarks.requests("gsm8k", root, 0)
    assert reqs[0] == Request("gen", (), "Question: Test 0?\nAnswer:", answer="1234",
                              stop=("Question:", "</s>", "<|im_end|>"), extract="gsm8k")
    assert [r.answer for r in reqs] == ["1234", "5", "-3"]
    shot = benchmarks.requests("gsm8k", root, 3)
    train = {f"Question: Train {i}?\nAnswer: Work.\n#### {i}\n\n" for i in range(20)}
    assert all(len(r.exemplars) == 3 and set(r.exemplars) <= train for r in shot)
    assert shot[0].question == reqs[0].question


def test_cmmlu_prompt_header_and_first_dev_rows(root):
    zero = benchmarks.requests("cmmlu", root, 0)
    question = "agronomy test 0\nA. 1\nB. 2\nC. 3\nD. 4\n答案："
    assert zero[0] == Request("mc", (), AGRONOMY + question, (" A", " B", " C", " D"), (3,), group="agronomy")
    assert [r.group for r in zero] == ["agronomy", "anatomy", "agronomy", "anatomy", "agronomy"]
    two = benchmarks.requests("cmmlu", root, 2)[0]
    assert two.exemplars == (AGRONOMY + "agronomy dev 0\nA. 甲\nB. 乙\nC. 丙\nD. 丁\n答案： A\n\n",
                             "agronomy dev 1\nA. 甲\nB. 乙\nC. 丙\nD. 丁\n答案： B\n\n")
    assert two.question == question and two.context.count(AGRONOMY) == 1  # once, before the exemplars
    with pytest.raises(ConfigError, match="dev/agronomy.csv holds only 5"):
        benchmarks.requests("cmmlu", root, 6)


@pytest.mark.parametrize("name,shots", [("piqa", 5), ("gsm8k", 5), ("cmmlu", 5), ("truthfulqa_mc", 6)])
def test_exemplars_never_come_from_the_scored_split(root, name, shots):
    reqs = benchmarks.requests(name, root, shots)
    scored = {r.question for r in reqs}
    assert all(len(r.exemplars) == shots for r in reqs)
    assert not [(q, e) for r in reqs for e in r.exemplars for q in scored if q in e]


@pytest.mark.parametrize("name", ["piqa", "gsm8k"])
def test_the_seed_fixes_the_drawn_exemplars(root, name):
    first = benchmarks.requests(name, root, 2, seed=1)
    assert benchmarks.requests(name, root, 2, seed=1) == first
    other = benchmarks.requests(name, root, 2, seed=2)
    assert [r.exemplars for r in other] != [r.exemplars for r in first]
    assert [r.question for r in other] == [r.question for r in first]
    assert len({r.exemplars for r in first}) > 1  # each item draws its own


@pytest.mark.parametrize("name", benchmarks.TASKS)
def test_limit_keeps_the_first_items(root, name):
    full = benchmarks.requests(name, root, 0)
    assert benchmarks.requests(name, root, 0, limit=2) == full[:2]
    assert benchmarks.requests(name, root, 0, limit=10_000) == full
    with pytest.raises(ConfigError):
        benchmarks.requests(name, root, 0, limit=0)


def _error(kind, name, root) -> str:
    with pytest.raises(kind) as caught:
        benchmarks.requests(name, root, 1 if name == "cmmlu" else 0)
    assert "\n" not in str(caught.value)
    return str(caught.value)


def test_errors_are_one_line_naming_the_file_and_line(root):
    assert f"{root / 'nowhere/eval_blimp'}: no such file" in _error(DataError, "blimp", root / "nowhere")
    (root / "eval_cmmlu/dev/anatomy.csv").unlink()
    assert f"{root / 'eval_cmmlu/dev/anatomy.csv'}: no such file" in _error(DataError, "cmmlu", root)
    (root / "eval_gsm8k/test.jsonl").write_text('{"question": "q", "answer": "#### 1"}\n{not json\n')
    assert f"{root / 'eval_gsm8k/test.jsonl'}:2: invalid JSON" in _error(DataError, "gsm8k", root)
    (root / "eval_gsm8k/test.jsonl").write_text('{"question": "q", "answer": "no final line"}\n')
    assert f"{root / 'eval_gsm8k/test.jsonl'}:1: no '#### <number>'" in _error(DataError, "gsm8k", root)
    _jsonl(root / "eval_sling/Aspect/zai_le.jsonl.gz", [{"sentence_good": "好"}])
    assert "zai_le.jsonl.gz:1: field 'sentence_bad' missing" in _error(DataError, "sling", root)
    (root / "eval_piqa/valid-labels.lst").write_text("0\n2\n")
    assert f"{root / 'eval_piqa/valid-labels.lst'}:2: label '2'" in _error(DataError, "piqa", root)
    (root / "eval_cmmlu/dev/agronomy.csv").write_text(",Question,A,B,C,D,Answer\n0,q,a,b,c,d,E\n")
    assert f"{root / 'eval_cmmlu/dev/agronomy.csv'}:2: not 7 fields" in _error(DataError, "cmmlu", root)
    (root / "eval_truthfulqa_mc/data/v0/mc_task.json").write_text('[{"question": "q", "mc2_targets": {"a": 0}}]')
    assert "mc_task.json: record 0: mc2_targets labels" in _error(DataError, "truthfulqa_mc", root)
    assert "known: blimp, sling, truthfulqa_mc, gsm8k, cmmlu, piqa" in _error(ConfigError, "mmlu", root)


def test_describe_notes_and_written_prompts(root, tmp_path):
    for name in benchmarks.TASKS:
        assert "\n" not in benchmarks.describe(name) and "harness" in benchmarks.notes(name)
    reqs = benchmarks.requests("cmmlu", root, 1, limit=2)
    benchmarks.write_prompts(reqs, tmp_path / "cmmlu_1shot.jsonl")
    lines = [json.loads(line) for line in (tmp_path / "cmmlu_1shot.jsonl").read_text().splitlines()]
    assert lines[0] == {"context": reqs[0].context, "choices": [" A", " B", " C", " D"], "gold": [3], "answer": "",
                        "group": "agronomy"}
    assert len(lines) == 2


# The shared folders as described in their READMEs: every pair, question and problem scored but PIQA's pool.
COUNTS = {"blimp": (0, 67_000), "sling": (0, 40_000), "truthfulqa_mc": (6, 817), "gsm8k": (5, 1_319),
          "cmmlu": (5, 11_582), "piqa": (5, 1_838 - benchmarks.piqa.POOL)}


@pytest.mark.skipif(not SHARED.is_dir(), reason=f"no shared evaluation data at {SHARED}")
@pytest.mark.parametrize("name", benchmarks.TASKS)
def test_the_shared_folders_give_the_documented_counts(name):
    shots, count = COUNTS[name]
    reqs = benchmarks.requests(name, SHARED, shots)
    assert len(reqs) == count and all(len(r.exemplars) == shots for r in reqs)
