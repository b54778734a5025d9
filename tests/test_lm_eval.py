"""lm-evaluation-harness evaluator on the tiny model with quantlab's offline tasks (conf/eval/lm_eval_tasks).

Accuracies are checked against an independent re-scoring of the same documents with the model's own
log-likelihoods, exact match against an independent greedy decode.
"""
from __future__ import annotations

import json
import math
import re
from importlib import metadata

import pytest
import torch
import yaml
from conftest import CONF, compose, cpu_ctx, run_cli
from hydra.utils import instantiate

from quantlab.errors import ConfigError, DataError
from quantlab.evals.base import EVALUATORS
from quantlab.evals.lm_eval_tasks import LmEvalTasks, _metric_names, load_local_jsonl
from quantlab.models.tiny import build_tiny_llama
from quantlab.nn.qat import QATLinear, swap_act_quant
from quantlab.nn.swap import iter_linears

pytest.importorskip("lm_eval")

TASK_DIR = CONF / "eval" / "lm_eval_tasks"
LOCAL = "eval/lm_eval_tasks"  # include_path as the preset writes it (resolved against the conf dir)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_tok():
    return build_tiny_llama()


def _docs(name: str) -> list[dict]:
    return [json.loads(line) for line in (TASK_DIR / "data" / name).read_text().splitlines()]


def _loglik(model, tok, context: str, continuation: str) -> float:
    """log p(continuation | context), scored with one plain forward pass (float64 sum)."""
    ctx = tok(context, add_special_tokens=False)["input_ids"]
    cont = tok(continuation, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ctx + cont])).logits[0].float()
    logp = torch.log_softmax(logits, dim=-1)
    return sum(float(logp[len(ctx) - 1 + i, t]) for i, t in enumerate(cont))


def _expected_mc(model, tok, docs, prompt, choices_of, prefix: str = "") -> tuple[float, float]:
    """(acc, acc_norm): argmax of log-likelihood and of log-likelihood per character (lm-eval)."""
    hits = hits_norm = 0
    for doc in docs:
        choices = choices_of(doc)
        lls = [_loglik(model, tok, prefix + prompt(doc), " " + c) for c in choices]
        hits += max(range(len(lls)), key=lambda i: lls[i]) == doc["label"]
        hits_norm += max(range(len(lls)), key=lambda i: lls[i] / len(choices[i])) == doc["label"]
    return hits / len(docs), hits_norm / len(docs)


def mc_prompt(d):
    return f"Question: {d['question']}\nAnswer:"


def yesno_prompt(d):
    return f"{d['passage']}\nQuestion: {d['question']}?\nAnswer:"


def test_preset_runs_with_provenance_and_group_table(model_tok, tmp_path):
    raw = yaml.safe_load((CONF / "eval" / "lm_eval_local.yaml").read_text())
    ev = instantiate(raw["lm_eval_local"], _convert_="all")
    res = ev.run(*model_tok, cpu_ctx(tmp_path))
    assert set(res.metrics) == {
        "lm_eval/quantlab_tiny/acc", "lm_eval/quantlab_tiny/acc_stderr",
        "lm_eval/quantlab_tiny_qa/exact_match", "lm_eval/quantlab_tiny_qa/exact_match_stderr",
    }
    assert all(0.0 <= v <= 1.0 for v in res.metrics.values())
    prov = res.provenance["lm_eval/quantlab_tiny/acc"]
    assert prov["harness"] == "lm-eval" and prov["harness_version"] == metadata.version("lm_eval")
    assert prov["task_version"] == "1.0" and prov["n_shot"] == 0 and prov["limit"] is None
    assert prov["n_samples"] == 16 and prov["subtasks"] == ["quantlab_tiny_mc", "quantlab_tiny_yesno"]
    assert prov["seed"] == 0 and prov["batch_size"] == 1 and prov["dataset_path"] == "json"
    qa = res.provenance["lm_eval/quantlab_tiny_qa/exact_match"]
    assert qa["n_samples"] == 5 and qa["task_version"] == 1.0 and qa["output_type"] == "generate_until"
    gen = qa["generation_kwargs"]
    assert gen["until"] == ["\n", ".", ","] and gen["do_sample"] is False and gen["max_gen_toks"] == 8
    assert qa["data_files"]["test"] == "data/tiny_qa_test.jsonl" and qa["filter"] == "remove_whitespace"
    rows = {r["task"]: r for r in res.tables["lm_eval_lm_eval_local"]}
    assert set(rows) == {"quantlab_tiny", "quantlab_tiny_mc", "quantlab_tiny_yesno", "quantlab_tiny_qa"}
    mc, yn = rows["quantlab_tiny_mc"], rows["quantlab_tiny_yesno"]
    assert mc["group"] == "quantlab_tiny" and 0 <= mc["acc_norm"] <= 1 and "acc_norm" not in yn
    # the group's acc is the size-weighted mean of its subtasks (aggregate_metric_list weight_by_size)
    assert res.metrics["lm_eval/quantlab_tiny/acc"] == pytest.approx((10 * mc["acc"] + 6 * yn["acc"]) / 16)


def test_acc_equals_independent_scoring_on_fake_quant_model(tmp_path):
    model, tok = build_tiny_llama()
    swap_act_quant(model, [n for n, _ in iter_linears(model)], act_bits=4)  # quantlab's fake-quant Linears
    assert isinstance(model.model.layers[0].mlp.up_proj, QATLinear)
    ev = LmEvalTasks(name="t", tasks=("quantlab_tiny_mc", "quantlab_tiny_yesno"), include_path=LOCAL,
                     bootstrap_iters=0)
    res = ev.run(model, tok, cpu_ctx(tmp_path))
    acc, acc_norm = _expected_mc(model, tok, _docs("tiny_mc_test.jsonl"), mc_prompt, lambda d: d["choices"])
    assert res.metrics["lm_eval/quantlab_tiny_mc/acc"] == pytest.approx(acc, abs=1e-12)
    assert res.metrics["lm_eval/quantlab_tiny_mc/acc_norm"] == pytest.approx(acc_norm, abs=1e-12)
    yn_docs = _docs("tiny_yesno_test.jsonl")
    yn_acc, _ = _expected_mc(model, tok, yn_docs, yesno_prompt, lambda d: ["no", "yes"])
    assert res.metrics["lm_eval/quantlab_tiny_yesno/acc"] == pytest.approx(yn_acc, abs=1e-12)
    assert "lm_eval/quantlab_tiny_mc/acc_stderr" not in res.metrics  # bootstrap_iters=0: no stderr
    # measured: mc acc 0.6, acc_norm 0.4, yes/no acc 0.5 (the float tiny model: 0.5 / 0.2 / 0.5)
    assert acc != acc_norm  # the fixture's choice lengths differ enough for the two metrics to disagree


def test_limit_and_per_task_num_fewshot(model_tok, tmp_path):
    model, tok = model_tok
    ev = LmEvalTasks(name="t", tasks=("quantlab_tiny_mc", "quantlab_tiny_yesno"), include_path=LOCAL, limit=4,
                     num_fewshot={"quantlab_tiny_mc": 2}, bootstrap_iters=0, log_samples=True)
    res = ev.run(model, tok, cpu_ctx(tmp_path))
    mc = res.provenance["lm_eval/quantlab_tiny_mc/acc"]
    yn = res.provenance["lm_eval/quantlab_tiny_yesno/acc"]
    assert (mc["n_shot"], mc["n_samples"], mc["n_samples_total"], mc["limit"]) == (2, 4, 10, 4)
    assert (yn["n_shot"], yn["n_samples"], yn["n_samples_total"]) == (0, 4, 6)
    # 2-shot context: the first two train items (sampler first_n), each "prompt answer", joined by blank lines
    train, test = _docs("tiny_mc_train.jsonl"), _docs("tiny_mc_test.jsonl")
    shots = "".join(f"{mc_prompt(d)} {d['choices'][d['label']]}\n\n" for d in train[:2])
    acc, acc_norm = _expected_mc(model, tok, test[:4], mc_prompt, lambda d: d["choices"], prefix=shots)
    # log_samples: per-document prompts and log-likelihoods, the same as scoring them ourselves
    samples = tmp_path / "lm_eval_samples" / "t" / "quantlab_tiny_mc.jsonl"
    logged = [json.loads(x) for x in samples.read_text().splitlines()]
    assert len(logged) == 4
    for d in logged:
        assert d["arguments"][0] == [shots + mc_prompt(d["doc"]), " " + d["doc"]["choices"][0]]
        ours = [_loglik(model, tok, shots + mc_prompt(d["doc"]), " " + c) for c in d["doc"]["choices"]]
        assert [r[0] for r in d["filtered_resps"]] == pytest.approx(ours, abs=1e-3)
    assert res.metrics["lm_eval/quantlab_tiny_mc/acc"] == pytest.approx(acc, abs=1e-12)
    assert res.metrics["lm_eval/quantlab_tiny_mc/acc_norm"] == pytest.approx(acc_norm, abs=1e-12)


def _greedy(model, tok, prompt: str, max_new: int = 8) -> str:
    """Greedy decode, cut at the first stop string (the qa task's "\\n" "." ",")."""
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    new: list[int] = []
    with torch.no_grad():
        for _ in range(max_new):
            nxt = int(model(input_ids=torch.tensor([ids + new])).logits[0, -1].argmax())
            if nxt == tok.eos_token_id:
                break
            new.append(nxt)
    return re.split(r"[\n.,]", tok.decode(new, skip_special_tokens=True))[0]


def test_exact_match_equals_independent_greedy_decode(model_tok, tmp_path):
    """A task in a temporary include dir (relative data_files); answer 1 is the model's greedy output."""
    model, tok = model_tok
    questions = ["What is two plus two", "What is the opposite of hot"]
    answer = _greedy(model, tok, f"Question: {questions[0]}?\nAnswer:").strip()
    (tmp_path / "d").mkdir()
    rows = [{"question": questions[0], "answer": answer}, {"question": questions[1], "answer": "zzqx"}]
    (tmp_path / "d" / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = yaml.safe_load((TASK_DIR / "quantlab_tiny_qa.yaml").read_text().replace("!function ", ""))
    cfg.update(task="tmp_qa", dataset_kwargs={"data_files": {"test": "d/qa.jsonl"}},
               filter_list=[{"name": "strip", "filter": [{"function": "remove_whitespace"},
                                                          {"function": "take_first"}]}])
    for key in ("training_split", "fewshot_split", "fewshot_config"):
        cfg.pop(key)
    text = yaml.safe_dump(cfg).replace("custom_dataset: ", "custom_dataset: !function ")
    (tmp_path / "tmp_qa.yaml").write_text(text)
    res = LmEvalTasks(name="g", tasks=("tmp_qa",), include_path=str(tmp_path), bootstrap_iters=0).run(
        model, tok, cpu_ctx(tmp_path))
    assert res.metrics == {"lm_eval/tmp_qa/exact_match": 0.5}, (answer, res.metrics)
    assert res.provenance["lm_eval/tmp_qa/exact_match"]["filter"] == "strip"


def test_model_and_tokenizer_unchanged(tmp_path):
    model, tok = build_tiny_llama()
    model.train()
    model.model.layers[1].mlp.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = {n: (p, p.device, p.dtype, p.requires_grad) for n, p in model.named_parameters()}
    tok.pad_token = None  # HFLM gives a tokenizer without one a pad token: it must get a copy
    tok_before = (tok.pad_token, tok.padding_side, len(tok))
    LmEvalTasks(name="t", tasks=("quantlab_tiny_yesno",), include_path=LOCAL, limit=2, bootstrap_iters=0).run(
        model, tok, cpu_ctx(tmp_path))
    assert model.training and all(m.training for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    after = {n: (p, p.device, p.dtype, p.requires_grad) for n, p in model.named_parameters()}
    assert after.keys() == params.keys() and all(after[n][0] is params[n][0] for n in params)
    assert all(after[n][1:] == params[n][1:] for n in params)
    assert (tok.pad_token, tok.padding_side, len(tok)) == tok_before == (None, "left", 259)
    assert torch.is_grad_enabled()


def test_unknown_task_and_offline_real_task_are_clear_errors(model_tok, tmp_path, monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    model, tok = model_tok
    with pytest.raises(ConfigError) as err:
        LmEvalTasks(name="z", tasks=("quantlab_tiny_mc", "no_such_task_xyz"), include_path=LOCAL).run(
            model, tok, cpu_ctx(tmp_path))
    assert err.value.key == "eval.z.tasks" and "no_such_task_xyz" in str(err.value)
    assert "'quantlab_tiny_mc'" not in str(err.value).split("close matches")[0]
    # a real task, offline, with an empty HF cache: one line naming the task, its dataset and the fix
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_datasets")
    with pytest.raises(DataError) as err:  # same include path: reuses the cached task index
        LmEvalTasks(name="z", tasks=("arc_easy",), include_path=LOCAL).run(model, tok, cpu_ctx(tmp_path))
    msg = str(err.value)
    assert "\n" not in msg and "'arc_easy'" in msg and "allenai/ai2_arc" in msg
    assert "Hugging Face Hub" in msg and "HF_DATASETS_OFFLINE" in msg and "eval=lm_eval_local" in msg


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"tasks": ()}, "tasks"),
        ({"tasks": ("a", "a")}, "tasks"),
        ({"num_fewshot": -1}, "num_fewshot"),
        ({"num_fewshot": {"other": 5}}, "num_fewshot"),
        ({"num_fewshot": {"a": 1.5}}, "num_fewshot"),
        ({"limit": 0}, "limit"),
        ({"limit": 1.5}, "limit"),
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": "big"}, "batch_size"),
        ({"max_length": 1}, "max_length"),
        ({"bootstrap_iters": -1}, "bootstrap_iters"),
        ({"seed": "x"}, "seed"),
        ({"log_samples": "yes"}, "log_samples"),
        ({"include_path": "/nonexistent/tasks"}, "include_path"),
    ],
)
def test_config_validation(kwargs, key):
    with pytest.raises(ConfigError) as err:
        LmEvalTasks(name="l", **{"tasks": ("a",), **kwargs})
    assert err.value.key == f"eval.l.{key}"


def test_valid_configs_and_registry():
    assert EVALUATORS.get("lm_eval") is LmEvalTasks and LmEvalTasks.kind == "lm_eval"
    ev = LmEvalTasks(tasks=["a", "b"], limit=0.5, batch_size="auto:4", num_fewshot={"b": 5})
    assert ev.tasks == ("a", "b") and ev.num_fewshot == {"b": 5}
    assert LmEvalTasks(tasks="a", include_path=LOCAL).include_dir() == TASK_DIR.resolve()


def test_missing_lm_eval_is_config_error(model_tok, tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "lm_eval", None)  # `import lm_eval` raises ImportError
    with pytest.raises(ConfigError, match=re.escape("quantlab[lmeval]")):
        LmEvalTasks(name="x", tasks=("quantlab_tiny_mc",)).run(*model_tok, cpu_ctx(tmp_path))


def test_metric_names_keep_filter_only_when_ambiguous():
    gsm = {"alias": "gsm8k", "exact_match,strict-match": 0.25, "exact_match_stderr,strict-match": 0.1,
           "exact_match,flexible-extract": 0.5, "exact_match_stderr,flexible-extract": "N/A"}
    assert {k: v[2] for k, v in _metric_names(gsm).items()} == {
        "exact_match/strict-match": 0.25, "exact_match_stderr/strict-match": 0.1,
        "exact_match/flexible-extract": 0.5,
    }
    trivia = {"exact_match,remove_whitespace": 0.0, "exact_match_stderr,remove_whitespace": 0.0,
              "sample_len": 5}
    assert set(_metric_names(trivia)) == {"exact_match", "exact_match_stderr"}


def test_load_local_jsonl_errors(tmp_path):
    with pytest.raises(DataError, match="no such file 'missing.jsonl'"):
        load_local_jsonl({"test": "missing.jsonl"}, quantlab_task_dir=str(tmp_path))
    (tmp_path / "bad.jsonl").write_text('{"a": 1}\n{not json\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: not valid JSON"):
        load_local_jsonl({"test": "bad.jsonl"}, quantlab_task_dir=str(tmp_path))
    ds = load_local_jsonl({"test": "data/tiny_yesno_test.jsonl"})  # default base: the shipped task dir
    assert ds["test"].num_rows == 6


@pytest.mark.parametrize(
    ("choice", "tasks", "shots"),
    [
        ("zeroshot_csr", ["boolq", "piqa", "social_iqa", "hellaswag", "winogrande", "arc_easy",
                          "arc_challenge", "openbookqa"], 0),
        ("fewshot", ["mmlu", "triviaqa"], 5),
    ],
)
def test_presets_compose(choice, tasks, shots):
    cfg = compose([f"eval={choice}", f"eval.{choice}.limit=100"])
    assert list(cfg.eval) == [choice]
    ev = instantiate(cfg.eval[choice], _convert_="all")
    assert isinstance(ev, LmEvalTasks) and ev.name == choice and list(ev.tasks) == tasks
    assert ev.num_fewshot == shots and ev.limit == 100 and ev.log_samples is False


def test_cli_end_to_end_with_perplexity(tmp_path):
    proc = run_cli(["+exp=demo_tiny", "quantizer=rtn", "eval=[ppl_local,lm_eval_local]",
                    "eval.ppl_local.max_windows=2", "eval.lm_eval_local.limit=3"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (path,) = sorted((tmp_path / "results").rglob("result.json"))
    rec = json.loads(path.read_text())
    assert rec["status"] == "ok" and rec["quantizer"]["name"] == "rtn"
    assert math.isfinite(rec["metrics"]["ppl/local_stdlib"])
    assert 0 <= rec["metrics"]["lm_eval/quantlab_tiny/acc"] <= 1
    prov = rec["provenance"]["lm_eval/quantlab_tiny_qa/exact_match"]
    assert prov["evaluator"] == "lm_eval" and prov["harness_version"] == metadata.version("lm_eval")
    assert prov["n_samples"] == 3 and prov["limit"] == 3 and prov["task_version"] == 1.0
    table = json.loads((path.parent / "lm_eval_lm_eval_local.json").read_text())
    assert {r["task"] for r in table} == {
        "quantlab_tiny", "quantlab_tiny_mc", "quantlab_tiny_yesno", "quantlab_tiny_qa"}
