"""LLM-QAT distillation on the tiny model: the loss falls, and a resumed run equals an uninterrupted one."""
from __future__ import annotations

import copy

import pytest
import torch

from quantlab.errors import ConfigError
from quantlab.models.mappings import get_mapping
from quantlab.models.tiny import build_tiny_llama
from quantlab.nn.qat import kv_linear_names, swap_qat
from quantlab.qat.train import TrainConfig, blocks_from_sequences, cosine_lr, distill_loss, train_qat

pytestmark = pytest.mark.usefixtures("one_thread")


def _student_teacher(wakv=(4, 8, 4)):
    teacher, _ = build_tiny_llama()
    student = copy.deepcopy(teacher)
    m = get_mapping(student)
    swap_qat(student, sorted(m.block_linears(student)), kv_linear_names(student), *wakv)
    return student, teacher


def _data(n=24, seq=16):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, seq), generator=g)


def test_soft_ce_and_kl_differ_by_the_teacher_entropy_and_share_the_gradient():
    s = torch.randn(3, 5, 11, requires_grad=True)
    t = torch.randn(3, 5, 11)
    ce, kl = distill_loss(s, t, "soft_ce"), distill_loss(s, t, "kl")
    p = t.softmax(-1)
    torch.testing.assert_close(ce - kl, -(p * p.log()).sum(-1).mean())
    g1, = torch.autograd.grad(ce, s)
    g2, = torch.autograd.grad(kl, s)
    torch.testing.assert_close(g1, g2)
    assert float(distill_loss(t, t, "kl")) == pytest.approx(0.0, abs=1e-6)


def test_training_lowers_the_distillation_loss():
    student, teacher = _student_teacher()
    data = _data()
    with torch.no_grad():
        before = float(distill_loss(student(input_ids=data).logits, teacher(input_ids=data).logits, "kl"))
    hist = train_qat(student, teacher, data, TrainConfig(steps=30, batch_size=4, seq_len=16, lr=1e-3, loss="kl"))
    with torch.no_grad():
        after = float(distill_loss(student(input_ids=data).logits, teacher(input_ids=data).logits, "kl"))
    assert len(hist) == 30 and all(torch.isfinite(torch.tensor(h["loss"])) for h in hist)
    assert after < 0.7 * before, (before, after)  # measured: 0.1769 -> 0.0889 (x0.50; tiny model, W4A8KV4, lr 1e-3)
    assert hist[-1]["lr"] < hist[0]["lr"]  # cosine decay


def test_resuming_from_a_checkpoint_equals_an_uninterrupted_run(tmp_path):
    cfg = TrainConfig(steps=8, batch_size=2, grad_accum=2, seq_len=16, lr=1e-3, checkpoint_every=3, seed=5)
    data = _data()
    a, teacher = _student_teacher()
    full = train_qat(a, teacher, data, cfg)
    b, teacher_b = _student_teacher()
    train_qat(b, teacher_b, data, cfg, checkpoint_dir=tmp_path, stop_after=3)  # the session ends after 3 steps
    c, teacher_c = _student_teacher()  # a fresh process: new student from the fp weights
    resumed = train_qat(c, teacher_c, data, cfg, checkpoint_dir=tmp_path)
    assert [h["step"] for h in resumed] == list(range(1, 9))
    assert resumed == full
    for (n, p), (_, q) in zip(a.named_parameters(), c.named_parameters()):
        assert torch.equal(p, q), n


def test_blocks_schedule_and_bad_settings():
    assert blocks_from_sequences([[1, 2, 3], [4, 5], [6, 7, 8, 9]], 4).tolist() == [[1, 2, 3, 4], [5, 6, 7, 8]]
    cfg = TrainConfig(steps=10, warmup_steps=2)
    assert cosine_lr(0, cfg) == 0.5 and cosine_lr(2, cfg) == 1.0 and cosine_lr(10, cfg) == pytest.approx(0.0)
    with pytest.raises(ConfigError, match="quantizer.train.loss"):
        TrainConfig(loss="mse")
    with pytest.raises(ConfigError, match="quantizer.train.seq_len"):
        blocks_from_sequences([[1, 2]], 4)
