"""LLM-QAT on several processes (issue 17): 2 gloo CPU processes (torch.multiprocessing spawn, torchrun's
environment variables) against 1 process, on the tiny Llama.

One spawn runs every distributed scenario (starting the 2 workers is most of the cost: ~15 s on 2
cores); the tests then compare what rank 0 (and rank 1) saved with single-process runs made here.
"""
from __future__ import annotations

import copy
import os
import shutil
import socket
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from quantlab.errors import ConfigError
from quantlab.models.mappings import get_mapping
from quantlab.models.tiny import build_tiny_llama
from quantlab.nn.qat import kv_linear_names, swap_qat
from quantlab.qat import parallel
from quantlab.qat.datagen import SEQUENCES, DataGenConfig, generate_data
from quantlab.qat.train import CHECKPOINT, TrainConfig, train_qat
from quantlab.quantizers.llm_qat import LLMQATConfig

pytestmark = pytest.mark.usefixtures("one_thread")

WORLD = 2
# 2 x 2 rows vs 1 x 4 rows: the losses agree to fp32 rounding (sums in another order). Measured over
# 4 steps at lr 1e-3: max |diff| 4.8e-7, max relative 9.4e-8, DDP and FSDP alike (bit-identical to each
# other); 2 x (2 micro-batches of 1 row) vs 1 x (2 of 2 rows): 6.9e-8. Bound: ~10x the largest.
REL_TOL = 1e-6
# the final student weights of the same runs: measured max |diff| 1.15e-6 (2.4e-6 of the largest weight
# of its tensor; AdamW's normalised steps of 1e-3 amplify tiny gradient differences). Bound: ~10x.
WEIGHT_TOL = 1e-5
DATA = DataGenConfig(n_sequences=7, max_length=10, batch_size=2, seed=3)  # 4 batches: 2 rounds of 2 ranks


def _student_teacher():
    teacher, _ = build_tiny_llama()
    student = copy.deepcopy(teacher)
    swap_qat(student, sorted(get_mapping(student).block_linears(student)), kv_linear_names(student), 4, 8, 4)
    return student, teacher


def _data():
    return torch.randint(0, 256, (24, 16), generator=torch.Generator().manual_seed(0))


def _cfg(parallel_mode: str = "none", **kw) -> TrainConfig:
    return TrainConfig(**{"steps": 4, "batch_size": 4, "seq_len": 16, "lr": 1e-3, "seed": 5,
                          "parallel": parallel_mode, **kw})


def _train(cfg: TrainConfig, **kw):
    student, teacher = _student_teacher()
    history = train_qat(student, teacher, _data(), cfg, **kw)
    return history, {n: p.detach().clone() for n, p in student.state_dict().items()}


def _worker(rank: int, port: int, out: Path) -> None:
    """One of the 2 ranks: every scenario, in the same order on both; rank 0 saves what it got."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    parallel.init(torch.device("cpu"))
    got: dict = {}
    for mode in ("ddp", "fsdp"):
        got[mode], got[f"{mode}_weights"] = _train(_cfg(mode))
        ck = out / f"ck_{mode}"
        _train(_cfg(mode), checkpoint_dir=ck, stop_after=2)  # the session ends after 2 of 4 steps
        if rank == 0:
            shutil.copytree(ck, out / f"ck_{mode}_step2")  # kept for the 1-process resume
        parallel.barrier()
        got[f"{mode}_resumed"], _ = _train(_cfg(mode), checkpoint_dir=ck)  # fresh students, same checkpoint
    got["ddp_accum"], _ = _train(_cfg("ddp", batch_size=2, grad_accum=2))  # 1 row per rank and micro-batch
    model, tok = build_tiny_llama()
    got["data"] = generate_data(model, tok, DATA, out / "data")
    got["data_cached"] = generate_data(model, tok, DATA, out / "data")  # rank 0 reads it, rank 1 receives it
    if rank:  # rank 1's student is sharded (FSDP): only the histories and the data
        got = {k: v for k, v in got.items() if not k.endswith("_weights")}
    torch.save(got, out / f"rank{rank}.pt")
    parallel.shutdown()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    """What the 2 ranks saved (``two[0]``, ``two[1]``) and their directory (``two["dir"]``)."""
    out = tmp_path_factory.mktemp("qat_ddp")
    ctx = mp.start_processes(_worker, args=(_free_port(), out), nprocs=WORLD, join=False,
                             start_method="spawn")
    deadline = time.monotonic() + 300
    while not ctx.join(timeout=2):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.terminate()
            pytest.fail("the 2 gloo workers did not finish in 300 s")
    saved = {r: torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)}
    return {**saved, "dir": out}


@pytest.fixture(scope="module")
def one():
    """The single-process reference: 4 steps of 4 rows (and of 2 x 2 rows accumulated)."""
    history, weights = _train(_cfg())
    return {"history": history, "weights": weights, "accum": _train(_cfg(batch_size=2, grad_accum=2))[0]}


def _max_rel(a: list[dict], b: list[dict]) -> float:
    assert [h["step"] for h in a] == [h["step"] for h in b] and [h["lr"] for h in a] == [h["lr"] for h in b]
    return max(abs(x["loss"] - y["loss"]) / abs(y["loss"]) for x, y in zip(a, b))


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_of_half_the_batch_follow_the_single_process_loss_curve(two, one, mode):
    assert len(two[0][mode]) == 4 and two[0][mode] == two[1][mode]  # every rank records the global mean
    assert _max_rel(two[0][mode], one["history"]) < REL_TOL
    weights = two[0][f"{mode}_weights"]  # rank 0's student holds the trained (unsharded) weights
    assert weights.keys() == one["weights"].keys()
    assert max(float((weights[k] - v).abs().max()) for k, v in one["weights"].items()) < WEIGHT_TOL
    if mode == "ddp":  # gradient accumulation: 2 micro-batches of 1 row per rank vs 2 of 2 rows
        assert _max_rel(two[0]["ddp_accum"], one["accum"]) < REL_TOL


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_a_two_process_checkpoint_resumes_on_two_processes_and_on_one(two, one, mode, tmp_path):
    assert two[0][f"{mode}_resumed"] == two[0][mode]  # stopped at 2, resumed to 4: the uninterrupted run
    state = torch.load(two["dir"] / f"ck_{mode}_step2" / CHECKPOINT, weights_only=False)
    plain, _ = _student_teacher()  # the single-process format: names of the plain model, parameters by index
    assert state["step"] == 2 and state["student"].keys() == plain.state_dict().keys()
    n = len(list(plain.parameters()))
    osd = state["optimizer"]
    assert osd["param_groups"][0]["params"] == list(range(n)) and set(osd["state"]) == set(range(n))
    shutil.copytree(two["dir"] / f"ck_{mode}_step2", tmp_path / "ck")
    resumed, _ = _train(_cfg(), checkpoint_dir=tmp_path / "ck")  # the same file, one process
    assert resumed[:2] == two[0][mode][:2] and _max_rel(resumed, one["history"]) < REL_TOL


def test_teacher_data_split_over_two_ranks_is_the_single_process_data(two, tmp_path):
    model, tok = build_tiny_llama()
    ref = generate_data(model, tok, DATA, tmp_path)
    for r in (0, 1):
        assert two[r]["data"] == ref and two[r]["data_cached"] == ref
    assert (two["dir"] / "data" / SEQUENCES).read_text() == (tmp_path / SEQUENCES).read_text()  # written once


def test_launch_mismatches_are_one_config_error(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    with pytest.raises(ConfigError, match=r"quantizer.train.parallel: ddp needs several processes"):
        TrainConfig(parallel="ddp")
    with pytest.raises(ConfigError, match="quantizer.train.parallel: must be one of"):
        TrainConfig(parallel="deepspeed")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="quantizer.train.parallel: torchrun started 2 processes"):
        TrainConfig()
    with pytest.raises(ConfigError, match="batch_size=3 .* divisible by the 2 processes"):
        TrainConfig(batch_size=3, parallel="fsdp")
    with pytest.raises(ConfigError, match="quantizer.train.parallel: a_quant=lsq"):
        LLMQATConfig(a_quant="lsq", train={"batch_size": 2, "parallel": "ddp"})
    cfg = LLMQATConfig(train={"batch_size": 2, "parallel": "fsdp"})
    monkeypatch.delenv("WORLD_SIZE")
    assert cfg.to_dict() == LLMQATConfig(train={"batch_size": 2}).to_dict()  # same variant and fingerprint


@pytest.mark.slow
def test_torchrun_cli_records_one_run_and_a_single_process_rerun_reuses_its_student(tmp_path):
    """``torchrun --nproc_per_node 2 -m quantlab ... parallel=fsdp`` end to end (40-65 s on 2 cores)."""
    import json
    import subprocess

    args = ["+exp=demo_tiny", "quantizer=llm_qat", "hydra.mode=RUN", "quantizer.data.n_sequences=6",
            "quantizer.data.max_length=24", "quantizer.train.steps=3", "quantizer.train.seq_len=16",
            "quantizer.train.batch_size=2", "eval=[ppl_local]"]
    env = {**os.environ, "QUANTLAB_RESULTS": str(tmp_path / "results"), "PYTHONUNBUFFERED": "1"}
    launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
              str(_free_port()), "-m", "quantlab"]
    proc = subprocess.run([*launch, *args, "quantizer.train.parallel=fsdp"], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    records = sorted((tmp_path / "results" / "runs").rglob("result.json"))
    assert len(records) == 1  # rank 1 wrote none (its Hydra dir was a removed temporary one)
    rec = json.loads(records[0].read_text())
    assert rec["status"] == "ok" and rec["quant_summary"]["train_world_size"] == 2
    assert rec["quant_summary"]["train"]["parallel"] == "fsdp"
    assert "parallel" not in rec["quantizer"]["config"]["train"]  # not in the variant: the rerun below reuses
    proc = subprocess.run([sys.executable, "-m", "quantlab", *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "reusing the trained student" in proc.stderr, proc.stderr[-3000:]
    proc = subprocess.run([*launch, *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0
    assert proc.stderr.count("error: quantizer.train.parallel: torchrun started 2 processes") == 1
