"""Prompt protocols of the code evaluators: plain, chat, instruct (EvalPlus), sqplus (the SmoothQuant+ harness).

Replies below marked "SmolLM2" are verbatim greedy outputs of SmolLM2-135M-Instruct (dequantized Q4_1) under
the instruct protocol, as the engine returns them (cut before the closing fence).
"""
from __future__ import annotations

import json

import pytest

from quantlab.errors import ConfigError
from quantlab.evals.code import runner as runner_mod
from quantlab.evals.code.humaneval import HUMANEVAL_STOPS, HumanEvalEval, load_humaneval
from quantlab.evals.code.multilingual import MultilingualCodeEval
from quantlab.evals.code.protocols import (
    INSTRUCT_PREFIX,
    INSTRUCT_STOPS,
    RESPONSE_PREFIX,
    SQPLUS_TEMPLATE,
    extract_code_block,
    instruct_completion,
    keep_definitions,
    make_protocol,
    sqplus_postprocess,
)
from quantlab.execution import Sandbox
from quantlab.generation import Completion, GenerationStats
from quantlab.types import RunContext

PROBLEMS = load_humaneval()
BY_ID = {p.task_id: p for p in PROBLEMS}
#: SmolLM2's chat template, reduced to what matters here (ChatML with a default system turn)
CHATML = ("{% for m in messages %}{% if loop.first and m['role'] != 'system' %}<|im_start|>system\nsys<|im_end|>\n"
          "{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")

# SmolLM2, HumanEval/28 (correct) and HumanEval/7 (wrong: tests `s in substring`)
SMOL_28 = ("def concatenate(strings: List[str]) -> str:\n    \"\"\" Concatenate list of strings into a single string\n"
           "    >>> concatenate([])\n    ''\n    >>> concatenate(['a', 'b', 'c'])\n    'abc'\n    \"\"\"\n"
           "    return ''.join(strings)")
SMOL_7 = ("def filter_by_substring(strings: List[str], substring: str) -> List[str]:\n    \"\"\"\n"
          "    Filters an input list of strings only for ones that contain given substring\n    \"\"\"\n"
          "    return [s for s in strings if s in substring]")


@pytest.fixture
def chat_tok(tiny):
    _, tok = tiny
    tok.chat_template = CHATML
    return tok


# --- prompts ------------------------------------------------------------------------------------------
def test_plain_is_the_prompt_with_the_datasets_stops(tiny):
    req = HumanEvalEval(name="humaneval").request(PROBLEMS[0], tiny[1])
    assert req.prompt == PROBLEMS[0].prompt and req.stop == HUMANEVAL_STOPS and req.add_special_tokens


def test_instruct_prompt_is_evalplus_with_the_reply_prefilled(chat_tok):
    p = PROBLEMS[0]
    req = HumanEvalEval(name="humaneval", protocol="instruct").request(p, chat_tok)
    expected = ("<|im_start|>system\nsys<|im_end|>\n<|im_start|>user\n" + INSTRUCT_PREFIX + "\n```\n" + p.prompt.strip()
                + "\n```\n<|im_end|>\n<|im_start|>assistant\n" + RESPONSE_PREFIX + "\n```python\n")
    assert req.prompt == expected
    assert req.stop == INSTRUCT_STOPS and "\n```" in req.stop and not req.add_special_tokens
    custom = HumanEvalEval(name="humaneval", protocol="instruct", instruction="Solve:", response_prefix="Here:")
    assert "user\nSolve:\n```\n" in custom.request(p, chat_tok).prompt
    assert custom.request(p, chat_tok).prompt.endswith("assistant\nHere:\n```python\n")


def test_instruct_needs_a_chat_template_and_python(tiny):
    with pytest.raises(ConfigError, match="chat template") as e:
        HumanEvalEval(name="humaneval", protocol="instruct").request(PROBLEMS[0], tiny[1])
    assert e.value.key == "eval.humaneval.protocol"
    for proto in ("instruct", "sqplus"):
        with pytest.raises(ConfigError, match="python") as e:
            MultilingualCodeEval(name="babelcode", protocol=proto, source="x.jsonl")
        assert e.value.key == "eval.babelcode.protocol"
    MultilingualCodeEval(name="babelcode", protocol="instruct", source="x.jsonl", languages=["python"])


def test_sqplus_prompt_is_the_papers_template():
    p = PROBLEMS[3]
    req = HumanEvalEval(name="humaneval", protocol="sqplus").request(p, None)
    assert req.prompt == ("Below is an instruction that describes a task. Write a response that appropriately "
                          "completes the request.\n\n\n### Instruction:\nCreate a Python script for this problem:\n"
                          + p.prompt + "\n\n### Response:")
    assert req.prompt == SQPLUS_TEMPLATE.format(prompt=p.prompt)
    assert req.stop == () and req.add_special_tokens  # EOS only; BOS as the tokenizer adds it (vLLM)
    ev = HumanEvalEval(name="humaneval", protocol="sqplus")
    assert ev.decoding(0).max_new_tokens == 2048 and not ev.decoding(0).do_sample
    assert HumanEvalEval(name="humaneval", protocol="instruct").decoding(0).max_new_tokens == 768
    assert HumanEvalEval(name="humaneval").decoding(0).max_new_tokens == 512
    assert make_protocol("sqplus", "k").deviations(False, 512, None) == ["max_new_tokens=512 (paper: 2048)"]
    assert make_protocol("sqplus", "k").deviations(False, 2048, None) == []


# --- extraction rules ---------------------------------------------------------------------------------
def test_code_block_rules():
    assert extract_code_block("x = 1\n").code == "x = 1\n" and "no fence" in extract_code_block("x = 1").rule
    one = extract_code_block("Sure:\n```python\ndef f():\n    return 1\n```\nIt returns 1.")
    assert one.code == "def f():\n    return 1" and one.rule == "block 1 of 1"
    two = "Usage:\n```python\nprint(f(2))\n```\nCode:\n```py\ndef f(x):\n    return x\n```\n"
    assert extract_code_block(two, "f").code == "def f(x):\n    return x"  # the block defining the entry point
    assert extract_code_block(two, "g").code == "print(f(2))"  # none defines it: the first
    open_ = extract_code_block("```python\ndef f():\n    return 1\n")
    assert open_.code == "def f():\n    return 1\n" and "closing fence missing" in open_.rule
    assert extract_code_block("```\n```\n").code == ""


def test_keep_definitions_drops_example_code_and_keeps_decorators():
    code = ("import math\nfrom typing import List\nK = 3\n\n@staticmethod\ndef f(x: int) -> int:\n    return x\n\n"
            "print(f(2))\nassert f(1) == 1\nif __name__ == '__main__':\n    import sys\n    sys.exit(0)\n"
            "class C:\n    pass\nf(3)\n")
    kept, rule = keep_definitions(code)
    assert kept == ("import math\nfrom typing import List\nK = 3\n@staticmethod\ndef f(x: int) -> int:\n    return x\n"
                    "class C:\n    pass")
    assert rule == "kept 5 definitions, dropped 4 statements"
    assert keep_definitions("def f(:\n")[0] == "def f(:\n"  # does not parse: tested as is (fails)


def test_instruct_completion_forms():
    closed, rule = instruct_completion(SMOL_28, "concatenate", closed=True)
    assert closed == "\n" + SMOL_28 + "\n" and rule.startswith("block 1 of 1;")
    assert "closing fence missing" in instruct_completion(SMOL_28, "concatenate", closed=False)[1]
    body, rule = instruct_completion("    return ''.join(strings)\n", "concatenate", closed=True)
    assert body == "    return ''.join(strings)\n" and "body continues the prompt" in rule
    chatty = "def f():\n    return 1\n\nprint(f())\n```\n\nThis prints 1.\n```python\nf()\n"
    assert instruct_completion(chatty, "f")[0] == "\ndef f():\n    return 1\n"


def test_instruct_programs_pass_and_fail_as_they_should():
    """prompt + extracted code + tests, run in the sandbox: SmolLM2's correct reply passes, its wrong one fails,
    example code after the function does not break a correct one, a body-only reply continues the prompt."""
    p28, p7 = BY_ID["HumanEval/28"], BY_ID["HumanEval/7"]
    ev = HumanEvalEval(name="humaneval", protocol="instruct", workers=2)
    proto = ev.prompt_protocol()
    replies = [
        (p28, SMOL_28, True),
        (p7, SMOL_7, False),
        (p28, SMOL_28 + "\n\nprint(concatenate(['x']))\nassert concatenate([]) == 'nope'\n", True),
        (p28, "    return ''.join(strings)", True),
        (p28, "def concatenate(strings):\n    return ''.join(strings)\nimport sys\nsys.exit(1)", True),
        (p28, "This is prose, not code.", False),
    ]
    programs = [ev.program(p, proto.completion(p, Completion(t, 9, "stop"))[0]) for p, t, _ in replies]
    for (p, text, expected), res in zip(replies, Sandbox(workers=2).run_many(programs)):
        assert p.judge(res).passed is expected, (text, p.judge(res))


# --- sqplus post-processing against an independent transcription of the reference ----------------------
def _reference(text: str) -> str:
    """Adlik/vllm examples/test_codellama_human_eval.py's post-processing, step by step (written for this test)."""
    r = text.split("### Response:")[-1]
    if "```python" in r:
        start = r.index("```python")
        r = r[start:].strip()
        r = r.replace("```python", "")
        try:
            r = r[: r.index("```")].strip()
        except ValueError:
            pass
    for marker, needle in (("__name__ == '__main__'", "if __name__ == '__main__':"), ("# Example usage", None),
                           ("###", None), ("</s>", None)):
        if marker in r:
            r = r[: r.index(needle or marker)].strip()
    return r


SQPLUS_OUTPUTS = [
    "\n```python\ndef f(x):\n    return x\n```\nThis function returns x.",
    " Here is the script:\n```python\nimport math\n\ndef f(x):\n    return math.sqrt(x)\n\n# Example usage\nprint(f(4))\n```",
    "\n    return sorted(set(l))\n\n### Instruction:\nnext task",
    "\n```python\ndef f(x):\n    return x\n\nif __name__ == '__main__':\n    print(f(1))\n```\n",
    "```python\ndef f(x):\n    return x  # no closing fence",
    "\ndef f(x):\n    return x\n### Response:\n```python\ndef g():\n    pass\n```",
    "\ndef f(x):\n    return x</s>",
    "```python\nprint(1)\n```python\ndef f():\n    pass\n```",
]


@pytest.mark.parametrize("text", SQPLUS_OUTPUTS)
def test_sqplus_postprocess_matches_the_reference(text):
    assert sqplus_postprocess(text) == _reference(text)


def test_sqplus_completion_is_a_human_eval_completion():
    p = BY_ID["HumanEval/28"]
    ev = HumanEvalEval(name="humaneval", protocol="sqplus", workers=2)
    text = "\n```python\nfrom typing import List\n\n" + SMOL_28 + "\n```\n\nThe function joins the strings."
    completion, _ = ev.prompt_protocol().completion(p, Completion(text, 40, "eos"))
    assert completion == "from typing import List\n\n" + SMOL_28
    (res,) = Sandbox(workers=1).run_many([ev.program(p, completion)])
    assert p.judge(res).passed


# --- the evaluator end to end, generation replaced by SmolLM2's replies -------------------------------
class InstructReplies:
    def __init__(self, replies: dict[str, str]):
        self.replies = replies

    def __call__(self, model, tok, requests, cfg, desc=None, on_batch=None):
        out = []
        for r in requests:
            task = next(p.task_id for p in PROBLEMS if p.prompt.strip() in r.prompt)
            out.append([Completion(self.replies.get(task, "pass"), 11, "stop")])
        if on_batch is not None and out:
            on_batch(list(range(len(out))), out)
        return out, GenerationStats(backend="fake", n_prompts=len(requests), generated_tokens=11 * len(out), wall_s=1.0)


def test_instruct_run_records_protocol_tested_code_and_per_problem_outcomes(tmp_path, monkeypatch, chat_tok, tiny):
    monkeypatch.setenv("QUANTLAB_RESULTS", str(tmp_path / "results"))
    monkeypatch.setattr(runner_mod, "generate", InstructReplies({"HumanEval/28": SMOL_28, "HumanEval/7": SMOL_7}))
    ev = HumanEvalEval(name="humaneval", protocol="instruct", path=None, workers=2)
    problems = [BY_ID["HumanEval/7"], BY_ID["HumanEval/28"]]
    monkeypatch.setattr(HumanEvalEval, "select", lambda self, ps: problems)
    ctx = RunContext(device="cpu", seed=0, output_dir=tmp_path / "run", run_fingerprint="fp")
    res = ev.run(tiny[0], chat_tok, ctx)
    assert res.metrics["humaneval/pass@1"] == 0.5
    assert res.per_item["humaneval/pass@1"] == {"HumanEval/7": 0.0, "HumanEval/28": 1.0}
    prov = res.provenance["humaneval/pass@1"]
    assert prov["protocol"] == "instruct" and prov["protocol_spec"]["response_prefix"] == RESPONSE_PREFIX
    assert prov["max_new_tokens"] == 768 and prov["protocol_deviations"] == []
    rows = [json.loads(x) for x in (tmp_path / "run" / "humaneval" / "outcomes.jsonl").read_text().splitlines()]
    assert rows[1]["tested_completion"] == "\n" + SMOL_28 + "\n" and "kept 1 definitions" in rows[1]["post_processing"]


def test_model_presets_name_their_protocol():
    from conftest import compose

    assert compose(["eval=[humaneval]"]).eval.humaneval.protocol == "instruct"  # SmolLM2-Instruct
    assert compose(["+exp=demo_tiny", "eval=[humaneval]"]).eval.humaneval.protocol == "plain"  # tiny base model
    assert compose(["+exp=sqplus_smollm2"]).eval.humaneval.protocol == "instruct"
    for size in ("7b", "13b", "34b"):
        cfg = compose([f"+exp=smoothquant_plus_{size}"])
        assert cfg.eval.humaneval.protocol == "sqplus" and cfg.model.code_protocol == "plain"


# --- test-set calibration flag --------------------------------------------------------------------------
@pytest.mark.parametrize("calib, flagged", [("humaneval_prompts", True), ("random_8x64", False)])
def test_calibration_on_the_eval_set_is_flagged(tmp_path, monkeypatch, calib, flagged):
    """SmoothQuant+ calibrated on the HumanEval prompts and evaluated on HumanEval: the record says so."""
    from conftest import compose

    from quantlab.cli import build_spec
    from quantlab.experiment import execute
    from quantlab.tracking.record import new_record

    monkeypatch.setenv("QUANTLAB_RESULTS", str(tmp_path / "results"))
    monkeypatch.setattr(runner_mod, "generate", InstructReplies({}))
    spec = build_spec(compose(["+exp=demo_tiny", "quantizer=smoothquant_plus", "quantizer.alpha=0.5",
                               "quantizer.format.group_size=32", f"calib={calib}", "calib.n_samples=3",
                               "eval=[humaneval,ppl_local]", "eval.humaneval.limit=1", "eval.humaneval.workers=1",
                               "eval.ppl_local.max_windows=1"]))
    (tmp_path / "run").mkdir()
    out = new_record(tmp_path / "run")
    execute(spec, tmp_path / "run", out)
    assert out.calib.get("calibrated_on_eval_set", []) == (["humaneval"] if flagged else [])
    assert out.provenance["humaneval/pass@1"].get("calibrated_on_eval_set", False) is flagged
    assert "calibrated_on_eval_set" not in out.provenance["ppl/local_stdlib"]  # stdlib text is not HumanEval


def test_perplexity_overlap_is_the_same_text():
    from quantlab.evals.perplexity import PerplexityEval

    ev = PerplexityEval(name="local_stdlib", dataset="local", path="stdlib", seqlen=64)
    assert not ev.calibration_overlap({"name": "local", "path": "stdlib_calib"})  # the offline default: disjoint
    assert ev.calibration_overlap({"name": "local", "path": "stdlib"})
    wiki = PerplexityEval(name="w", dataset="wikitext2", split="test", seqlen=64)
    assert wiki.calibration_overlap({"name": "wikitext2", "split": "test"})
    assert not wiki.calibration_overlap({"name": "wikitext2", "split": "train"})
    assert not wiki.calibration_overlap({"name": "humaneval"})
