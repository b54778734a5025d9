"""Published tables transcribed from the seed papers (src/quantlab/published/*.yaml).

Checks the schema, hand-read cells, the cell counts, and (where the seed texts are present) re-parses
rows straight from the seed text. Offline and quantlab-free on purpose: only yaml, pathlib and pytest.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

PUBLISHED = Path(__file__).resolve().parents[1] / "src" / "quantlab" / "published"
SEEDS = Path("/work/shared/seeds")

FILES = ("sqplus_table1", "sqplus_table2", "sqplus_table5", "roy_table6", "roy_table7",
         "llmqat_table1", "llmqat_table2")
TOP_KEYS = ("paper", "arxiv", "table", "page", "seed_file", "seed_line", "caption", "scale", "protocol",
            "notes", "cells")
CELL_KEYS = ("model", "method", "setting", "metric", "printed", "value", "row_label", "column_label")
MODELS = {"codellama_7b", "codellama_13b", "codellama_34b", "llama_7b", "llama_13b", "llama_30b",
          "stablelm_3b", "redpajama_3b", "falcon_7b", "falcon_40b", "llama2_7b", "llama2_13b", "llama2_70b"}
METHODS = {"none", "rtn", "awq", "gptq", "smoothquant", "smoothquant_plus", "llm_qat", "bnb"}
NULL_MODEL_OK = {"sqplus_table5"}  # a method-comparison table about no particular model

HEAD = {  # (arxiv, table, seed_file, scale, protocol)
    "sqplus_table1": ("2312.03788", 1, "000_fad326752c33a30f.txt", 0.01, {"protocol": "sqplus"}),
    "sqplus_table2": ("2312.03788", 2, "000_fad326752c33a30f.txt", 0.01, {"protocol": "sqplus_babelcode"}),
    "sqplus_table5": ("2312.03788", 5, "000_fad326752c33a30f.txt", 1, {"protocol": "sqplus"}),
    "roy_table6": ("2309.05210", 6, "002_819dfa2d0fe55b1a.txt", 1, {}),
    "roy_table7": ("2309.05210", 7, "002_819dfa2d0fe55b1a.txt", 1, {}),
    "llmqat_table1": ("2305.17888", 1, "004_53d317d0d0d0bf16.txt", 0.01, {"n_shot": 0}),
    "llmqat_table2": ("2305.17888", 2, "004_53d317d0d0d0bf16.txt", 1, {}),
}

_TABLES: dict[str, dict] = {}


def table(name: str) -> dict:
    if name not in _TABLES:
        _TABLES[name] = yaml.safe_load((PUBLISHED / f"{name}.yaml").read_text(encoding="utf-8"))
    return _TABLES[name]


def key(c: dict) -> tuple:
    return (c["model"], c["method"], c["setting"], c["metric"])


def by_key(name: str) -> dict[tuple, dict]:
    return {key(c): c for c in table(name)["cells"]}


def numbers(printed: str) -> list[float]:
    return [float(x) for x in re.findall(r"\d+(?:\.\d+)?", printed)]


# ----------------------------------------------------------------------------------------- 1. schema
def test_exactly_the_seven_tables_are_published():
    assert sorted(p.stem for p in PUBLISHED.glob("*.yaml")) == sorted(FILES)
    assert not (PUBLISHED / "__init__.py").exists()


@pytest.mark.parametrize("name", FILES)
def test_schema(name):
    t = table(name)
    assert set(TOP_KEYS) <= set(t), set(TOP_KEYS) - set(t)
    arxiv, number, seed_file, scale, protocol = HEAD[name]
    assert (t["arxiv"], t["table"], t["seed_file"], t["scale"], t["protocol"]) == (
        arxiv, number, seed_file, scale, protocol)
    assert t["page"] is None  # the seed texts have no page breaks
    assert isinstance(t["seed_line"], int) and t["seed_line"] > 0
    for k in ("paper", "caption", "notes"):
        assert isinstance(t[k], str) and t[k].strip()
    first_line = (PUBLISHED / f"{name}.yaml").read_text(encoding="utf-8").splitlines()[0]
    assert first_line.startswith("# ")

    seen = set()
    for c in t["cells"]:
        assert set(CELL_KEYS) <= set(c), (c, set(CELL_KEYS) - set(c))
        assert c["model"] in MODELS or (c["model"] is None and name in NULL_MODEL_OK), c
        assert c["method"] in METHODS, c
        assert isinstance(c["setting"], str) and c["setting"], c
        assert isinstance(c["metric"], str) and "/" in c["metric"], c
        assert isinstance(c["printed"], str) and c["printed"].strip() not in ("", "-"), c
        assert isinstance(c["value"], float), c
        nums = numbers(c["printed"])
        if c["metric"].endswith("tokens_per_s_min"):
            assert len(nums) == 2 and c["value"] == nums[0], c
        elif c["metric"].endswith("tokens_per_s_max"):
            assert len(nums) == 2 and c["value"] == nums[1], c
        else:
            assert len(nums) == 1 and c["value"] == nums[0], c
        if "scale" in c:
            assert isinstance(c["scale"], (int, float)) and c["scale"] > 0, c
        assert key(c) not in seen, f"duplicate cell {key(c)}"
        seen.add(key(c))


def test_percent_tables_hold_percent_and_settings_follow_the_vocabulary():
    for name in ("sqplus_table1", "sqplus_table2"):
        for c in table(name)["cells"]:
            assert c["printed"].endswith("%")
            assert (c["method"], c["setting"]) in {("none", "fp16"), ("rtn", "w4g128a"), ("awq", "w4g128a"),
                                                  ("smoothquant_plus", "w4g128a")}
    for name in ("roy_table6", "roy_table7"):
        for c in table(name)["cells"]:
            assert (c["method"], c["setting"]) in {("bnb", s) for s in ("nf4", "nf4-dq", "fp4", "fp4-dq", "int8")} | {
                ("none", "fp16")}
            assert c["paper_label"] == f"{c['row_label']} / {c['column_label']}"
    for name in ("llmqat_table1", "llmqat_table2"):
        for c in table(name)["cells"]:
            assert re.fullmatch(r"\d+-\d+-\d+", c["setting"]), c
            assert (c["method"] == "none") == (c["setting"] == "16-16-16"), c
            assert isinstance(c["row"], int)
    # LLM-QAT Table 1: the accuracy columns use the file's percent scale, #OPs / Size override it with 1
    for c in table("llmqat_table1")["cells"]:
        assert ("scale" in c) == c["metric"].startswith("paper/"), c
        if "scale" in c:
            assert c["scale"] == 1


# ----------------------------------------------------------------------------------- 2. hand-read cells
HAND = {  # read by eye from the seed text; (model, method, setting, metric) -> value
    "sqplus_table1": {  # seed lines 69-72
        ("codellama_7b", "none", "fp16", "humaneval/pass@1"): 35.98,  # first row
        ("codellama_13b", "rtn", "w4g128a", "humaneval/pass@1"): 33.54,
        ("codellama_34b", "awq", "w4g128a", "humaneval/pass@1"): 50.61,
        ("codellama_13b", "smoothquant_plus", "w4g128a", "humaneval/pass@1"): 37.80,
        ("codellama_34b", "smoothquant_plus", "w4g128a", "humaneval/pass@1"): 53.05,  # last row
    },
    "sqplus_table2": {  # seed lines 77-78
        ("codellama_34b", "none", "fp16", "babelcode/python/pass@1"): 51.22,  # first row
        ("codellama_34b", "none", "fp16", "babelcode/go/pass@1"): 26.71,
        ("codellama_34b", "smoothquant_plus", "w4g128a", "babelcode/java/pass@1"): 44.10,
        ("codellama_34b", "smoothquant_plus", "w4g128a", "babelcode/cpp/pass@1"): 41.62,
        ("codellama_34b", "smoothquant_plus", "w4g128a", "babelcode/avg/pass@1"): 41.05,  # last row
    },
    "sqplus_table5": {  # seed lines 106-108
        (None, "smoothquant", "w8a8", "paper/weight_bits"): 8.0,  # first row
        (None, "smoothquant", "w8a8", "paper/activation_bits"): 8.0,
        (None, "awq", "w4g128a", "paper/activation_bits"): 16.0,
        (None, "smoothquant_plus", "w4g128a", "paper/weight_bits"): 4.0,  # last row
    },
    "roy_table6": {  # seed lines 199-205
        ("stablelm_3b", "bnb", "nf4", "memory/footprint_gb"): 3.22,  # first row
        ("stablelm_3b", "bnb", "fp4-dq", "memory/footprint_gb"): 3.06,
        ("falcon_7b", "none", "fp16", "memory/footprint_gb"): 14.50,
        ("llama2_13b", "bnb", "nf4-dq", "memory/footprint_gb"): 7.8,
        ("falcon_40b", "bnb", "fp4", "memory/footprint_gb"): 26.55,
        ("llama2_70b", "bnb", "int8", "memory/footprint_gb"): 70.44,  # last row
    },
    "roy_table7": {  # seed lines 210-216
        ("stablelm_3b", "bnb", "nf4", "sampling/tokens_per_s_min"): 37.76,  # first row
        ("stablelm_3b", "bnb", "nf4", "sampling/tokens_per_s_max"): 62.79,
        ("redpajama_3b", "bnb", "int8", "sampling/tokens_per_s_min"): 2.52,
        ("llama2_13b", "bnb", "fp4", "sampling/tokens_per_s_min"): 12.0,
        ("falcon_40b", "none", "fp16", "sampling/tokens_per_s_max"): 13.99,
        ("llama2_70b", "bnb", "fp4-dq", "sampling/tokens_per_s_max"): 8.82,  # last row
    },
    "llmqat_table1": {  # seed lines 111-185 (paper rows 1-75)
        ("llama_7b", "none", "16-16-16", "lm_eval/boolq/acc"): 76.8,  # row 1 (first)
        ("llama_7b", "none", "16-16-16", "paper/ops_1e15"): 3.81,  # row 1
        ("llama_7b", "gptq", "4-16-16", "lm_eval/hellaswag/acc_norm"): 69.4,  # row 15
        ("llama_13b", "gptq", "4-16-16", "lm_eval/winogrande/acc"): 72.6,  # row 40
        ("llama_30b", "none", "16-16-16", "lm_eval/arc_easy/acc_norm"): 80.0,  # row 51, printed "80"
        ("llama_30b", "llm_qat", "4-8-4", "lm_eval/csr_avg"): 69.9,  # row 54, text line 104
        ("llama_30b", "smoothquant", "8-8-4", "lm_eval/csr_avg"): 50.7,  # row 68, text line 104
        ("llama_30b", "llm_qat", "8-8-4", "lm_eval/csr_avg"): 69.7,  # row 69, text line 104
        ("llama_30b", "llm_qat", "8-8-16", "lm_eval/openbookqa/acc_norm"): 56.8,  # row 75 (last)
        ("llama_30b", "llm_qat", "8-8-16", "lm_eval/csr_avg"): 70.8,  # row 75
    },
    "llmqat_table2": {  # seed lines 191-215 (paper rows 1-25)
        ("llama_7b", "none", "16-16-16", "ppl/c4"): 7.2,  # row 1 (first)
        ("llama_7b", "none", "16-16-16", "ppl/wikitext2"): 10.4,  # row 1
        ("llama_7b", "rtn", "4-8-4", "ppl/wikitext2"): 151.4,  # row 2
        ("llama_13b", "gptq", "4-16-16", "ppl/c4"): 6.8,  # row 15
        ("llama_30b", "rtn", "8-8-4", "ppl/wikitext2"): 7.8,  # row 17
        ("llama_7b", "llm_qat", "8-8-16", "ppl/c4"): 7.0,  # row 25 (last)
        ("llama_30b", "llm_qat", "8-8-16", "ppl/wikitext2"): 7.1,  # row 25
    },
}


@pytest.mark.parametrize("name", FILES)
def test_hand_read_cells(name):
    cells = by_key(name)
    assert len(HAND[name]) >= 4
    for k, v in HAND[name].items():
        assert k in cells, k
        assert cells[k]["value"] == pytest.approx(v, abs=1e-9), (k, cells[k])


def test_llmqat_row_numbers_match_the_text():
    t1 = by_key("llmqat_table1")
    assert t1[("llama_30b", "smoothquant", "8-8-4", "lm_eval/csr_avg")]["row"] == 68
    assert t1[("llama_30b", "llm_qat", "8-8-4", "lm_eval/csr_avg")]["row"] == 69
    assert t1[("llama_30b", "rtn", "4-8-8", "lm_eval/csr_avg")]["row"] == 55
    assert t1[("llama_30b", "llm_qat", "4-8-8", "lm_eval/csr_avg")]["row"] == 57
    rows1 = {c["row"] for c in table("llmqat_table1")["cells"]}
    rows2 = {c["row"] for c in table("llmqat_table2")["cells"]}
    assert rows1 == set(range(1, 76)) and rows2 == set(range(1, 26))


# ------------------------------------------------------------------------------------------ 3. counts
COUNTS = {
    "sqplus_table1": 12,  # 4 rows (FP16, RTN, AWQ, SmoothQuant+) x 3 models (7B, 13B, 34B)
    "sqplus_table2": 10,  # 2 rows (FP16, SmoothQuant+) x 5 columns (Python, JAVA, GO, C++, Average)
    "sqplus_table5": 6,  # 3 rows x 2 numeric columns (Weight bits, Activation bits); the rest are marks
    "roy_table6": 41,  # 7 models x 6 columns = 42, minus llama2_70b fp16 printed "-"
    "roy_table7": 82,  # the same 41 printed (min, max) pairs, two cells each
    "llmqat_table1": 825,  # 75 numbered rows x 11 numeric columns (#OPs, Size, 8 tasks, Avg.)
    "llmqat_table2": 150,  # 25 numbered rows x 3 model blocks x 2 columns (C4, Wiki2)
}


@pytest.mark.parametrize("name", FILES)
def test_cell_counts(name):
    assert len(table(name)["cells"]) == COUNTS[name]


# ------------------------------------------------------------------- 4. re-parse rows from the seeds
def seed_lines(name: str) -> list[str]:
    if not SEEDS.is_dir():
        pytest.skip("seed texts not available")
    return (SEEDS / table(name)["seed_file"]).read_text(encoding="utf-8").splitlines()


def printed_at(name: str, **match) -> dict[str, str]:
    """column_label -> printed for the cells whose fields equal ``match`` (one metric per column)"""
    out: dict[str, str] = {}
    for c in table(name)["cells"]:
        if all(c.get(k) == v for k, v in match.items()):
            out.setdefault(c["column_label"], c["printed"])
            assert out[c["column_label"]] == c["printed"]
    return out


@pytest.mark.parametrize("name", FILES)
def test_caption_and_seed_line_come_from_the_seed(name):
    lines = seed_lines(name)
    t = table(name)
    assert t["caption"] in "\n".join(lines)
    assert lines[t["seed_line"] - 1].startswith(HEADER_STARTS[name]), lines[t["seed_line"] - 1]


HEADER_STARTS = {  # the seed line each table's seed_line points at (its header row)
    "sqplus_table1": "HumanEval | 7B | 13B | 34B |",
    "sqplus_table2": "HumanEval | Python | JAVA | GO | C++ | Average |",
    "sqplus_table5": "Quantization method | Weight bits | Activation bits | Accuracy | Efficiency |",
    "roy_table6": "Model\tbnb.nf4\tbnb.nf4-dq\tbnb.fp4\tbnb.f4-dq\tbnb.int8\tfp16",
    "roy_table7": "Model\tbnb.nf4\tbnb.nf4-dq\tbnb.fp4\tbnb.f4-dq\tbnb.int8\tfp16",
    "llmqat_table1": "\tMethod\t#Bits\t#OPs",
    "llmqat_table2": "\t#Bits\tMethod\tPerplexity",
}


def _pipe(line: str) -> list[str]:
    return [p.strip() for p in line.split("|")][:-1]


@pytest.mark.parametrize("name, rows", [
    ("sqplus_table1", ("FP16", "AWQ", "SmoothQuant+")),
    ("sqplus_table2", ("FP16", "SmoothQuant+")),
    ("sqplus_table5", ("SmoothQuant", "SmoothQuant+")),
])
def test_reparse_sqplus(name, rows):
    lines = seed_lines(name)
    start = table(name)["seed_line"] - 1
    header = _pipe(lines[start])
    body = {}
    for ln in lines[start + 2:]:
        if "|" not in ln:
            break
        parts = _pipe(ln)
        body[parts[0]] = dict(zip(header[1:], parts[1:]))
    for r in rows:
        got = printed_at(name, row_label=r)
        assert got and all(body[r][col] == p for col, p in got.items()), (r, got, body[r])


@pytest.mark.parametrize("name, models", [
    ("roy_table6", ("stablilm_3b", "llama2_13b", "llama2_70b")),
    ("roy_table7", ("stablilm_3b", "falcon_40b", "llama2_70b")),
])
def test_reparse_roy(name, models):
    lines = seed_lines(name)
    start = table(name)["seed_line"] - 1
    header = lines[start].split("\t")
    assert header[0] == "Model"
    body = {}
    for ln in lines[start + 1:]:
        if "\t" not in ln:
            break
        parts = ln.split("\t")
        body[parts[0]] = dict(zip(header[1:], parts[1:]))
    assert len(body) == 7
    for m in models:
        got = printed_at(name, row_label=m)
        expect = {col: v for col, v in body[m].items() if v != "-"}
        assert got == expect, (m, got, expect)


@pytest.mark.parametrize("rowno", [1, 4, 15, 26, 51, 68, 69, 75])
def test_reparse_llmqat_table1(rowno):
    lines = seed_lines("llmqat_table1")
    start = table("llmqat_table1")["seed_line"] - 1
    header = lines[start].split("\t")
    assert header[1:3] == ["Method", "#Bits"]
    (ln,) = [x for x in lines[start + 1:start + 76] if x.split("\t")[0] == str(rowno)]
    parts = ln.split("\t")
    got = printed_at("llmqat_table1", row=rowno)
    assert got == dict(zip(header[3:], parts[3:]))
    (label,) = {c["row_label"] for c in table("llmqat_table1")["cells"] if c["row"] == rowno}
    (setting,) = {c["setting"] for c in table("llmqat_table1")["cells"] if c["row"] == rowno}
    assert (label, setting) == (parts[1], parts[2])


@pytest.mark.parametrize("rowno", [1, 2, 15, 25])
def test_reparse_llmqat_table2(rowno):
    lines = seed_lines("llmqat_table2")
    start = table("llmqat_table2")["seed_line"] - 1
    assert lines[start].split("\t")[1:3] == ["#Bits", "Method"]
    (ln,) = [x for x in lines[start + 2:start + 27] if x.split("\t")[0] == str(rowno)]
    parts = ln.split("\t")
    blocks = ("llama_7b", "llama_13b", "llama_30b")
    for b, model in enumerate(blocks):
        label, c4, wiki2 = parts[2 + 3 * b:5 + 3 * b]
        cells = [c for c in table("llmqat_table2")["cells"] if c["row"] == rowno and c["model"] == model]
        assert {c["metric"]: c["printed"] for c in cells} == {"ppl/c4": c4, "ppl/wikitext2": wiki2}
        assert {(c["row_label"], c["setting"]) for c in cells} == {(label, parts[1])}
