"""LLM-QAT (Liu et al. 2023): data-free quantization-aware training with logit distillation.

1. Data (section 2.1): the full-precision model generates its own training text, first token from the
   vocabulary, a greedy prefix of 3-5 tokens, the rest sampled from the 50 most likely tokens
   (:mod:`quantlab.qat.datagen`). The sequences are cached under
   ``results/cache/qat_data/<teacher + settings hash>`` and reused by every run with the same teacher
   and data settings (an interrupted generation resumes).
2. Student (section 2.2): the same model with every selected Linear swapped for a
   :class:`~quantlab.nn.qat.QATLinear`: weights W-bit symmetric MinMax per output channel, inputs A-bit
   per token, k_proj / v_proj outputs (the KV cache, before RoPE) KV-bit per token, Eq. (3), with a
   straight-through estimator. lm_head and the embeddings stay in full precision.
3. Training: logit distillation from a frozen copy of the full-precision model (Eq. 4), AdamW lr 2e-5,
   no weight decay, cosine schedule (:mod:`quantlab.qat.train`). Every parameter of the student is
   trained. Progress is checkpointed under ``results/cache/qat/<run fingerprint>`` so rerunning the
   same command resumes; a finished training leaves ``student.safetensors`` there (and a rerun reuses
   it), or anywhere ``load_student`` points.
   Under torchrun, ``train.parallel=ddp|fsdp`` splits the data generation and each batch over the
   ranks (:mod:`quantlab.qat.parallel`); rank 0 alone writes the files and goes on to the evaluation,
   the other ranks end with :class:`~quantlab.qat.parallel.FollowerDone` once training is over.

Where the public code differs from the paper the choice is a setting and is recorded: ``arith`` (Eq. 3
vs the code's epsilons), ``ste_clip`` (plain STE vs the code's fixed [-2, 2] gradient window),
``data.first_token`` (random vs enumerated), ``train.loss`` (soft CE vs KL). Where the paper leaves a
value open and the code fixes it, the default is the code's: ``data.top_k`` 50 (the paper: "sampled
from top-k candidates", Fig. 2, no k given; the code's ``generate(do_sample=True)`` keeps Hugging
Face's default top_k=50; ``data.top_k=0``, the full softmax, is not the reference). quantlab's own
choices, stated in :mod:`quantlab.qat.train`: the loss is a mean over tokens (the code's is summed
over the sequence, T times larger) and gradients are not clipped (the code's Hugging Face Trainer
clips their norm at 1.0, its ``max_grad_norm`` default). The method label names the departures listed
in :meth:`LLMQATQuantizer.label`; every setting (the budget, ``data.first_token``, ``train.loss``, ...)
is in the run's variant.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, cast

import torch
from torch import nn

from quantlab.errors import ConfigError
from quantlab.formats.spec import QuantFormat
from quantlab.formats.wakv import WAKV
from quantlab.nn.qat import A_QUANTS, ARITHS, W_QUANTS, kv_linear_names, swap_wakv
from quantlab.qat import parallel
from quantlab.qat.datagen import DataGenConfig, generate_data
from quantlab.qat.plots import plot_loss_curve
from quantlab.qat.train import TrainConfig, blocks_from_sequences, train_qat
from quantlab.quantizers.base import Quantizer, QuantizerConfig, register_quantizer
from quantlab.types import CalibData, QuantResult, RunContext
from quantlab.utils.hashing import fingerprint
from quantlab.utils.paths import results_root

log = logging.getLogger(__name__)

STUDENT_FILE = "student.safetensors"
REFERENCE_TOP_K = 50  # the code's sampling of the teacher data (Hugging Face generate's default top_k)


def _sub(value: Any, cls: type, key: str) -> Any:
    if isinstance(value, cls):
        return value
    if not isinstance(value, dict):
        raise ConfigError(key, f"must be a mapping of {cls.__name__} settings, got {value!r}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(value) - names)
    if unknown:
        raise ConfigError(f"{key}.{unknown[0]}", f"unknown setting (known: {sorted(names)})")
    return cls(**value)


@dataclass(frozen=True)
class LLMQATConfig(QuantizerConfig):
    """LLM-QAT settings (defaults: the paper's, with a CPU-sized data and training budget).

    Attributes:
        wakv: ``W-A-KV`` bits, e.g. ``4-8-4`` (Tables 1-2 use 4-8-4, 4-8-8, 4-6-16, 4-8-16, 4-16-16,
            8-8-4, 8-8-8, 8-8-16).
        format: the weight format, fixed by the method: per output channel, symmetric, W bits
            (derived from ``wakv``; given only so that Hydra's format group composes; bits other than W
            are an error, never overwritten).
        arith: ``paper`` (Eq. 3) or ``code`` (the public code's ``s = qmax / (max + 1e-6)``).
        ste_clip: ``null`` (plain straight-through estimator) or 2.0 (the public code's fixed window).
        w_quant: ``minmax`` (the paper's) or ``statsq`` (Table 4's clipping arm for weights).
        a_quant: ``minmax`` (the paper's) or ``lsq`` (Table 4's clipping arm for activations).
        statsq_k: StatsQ clipping threshold in units of ``mean|W|`` per output channel.
        data: teacher generation settings (:class:`~quantlab.qat.datagen.DataGenConfig`).
        train: training settings (:class:`~quantlab.qat.train.TrainConfig`).
        data_dir: where the generated sequences live (null: ``results/cache/qat_data/<hash>``).
        load_student: a ``student.safetensors`` (or a directory holding one) from a finished training
            with the same W-A-KV: load it instead of generating data and training.
    """

    wakv: str = "4-8-4"
    format: QuantFormat | None = None
    arith: str = "paper"
    ste_clip: float | None = None
    w_quant: str = "minmax"
    a_quant: str = "minmax"
    statsq_k: float = 2.0
    data: DataGenConfig = field(default_factory=DataGenConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data_dir: str | None = None
    load_student: str | None = None

    execution_fields: ClassVar[tuple[str, ...]] = ("data_dir",)  # where the cached sequences live

    def __post_init__(self) -> None:
        if self.wakv is None:
            raise ConfigError("quantizer.wakv", "llm_qat needs W-A-KV bits, e.g. 4-8-4")
        super().__post_init__()
        setting = WAKV.parse(self.wakv)
        fmt = self.format
        if fmt is not None and (fmt.kind != "int" or fmt.group_size != -1 or not fmt.symmetric):
            raise ConfigError("quantizer.format", "llm_qat quantizes weights per output channel, symmetric MinMax "
                                                  f"(Eq. 3); got {fmt.short_name()} (the bits follow quantizer.wakv)")
        derived = QuantFormat(bits=setting.w_bits, group_size=-1, symmetric=True) if setting.quantizes_weights else None
        object.__setattr__(self, "format", derived)
        object.__setattr__(self, "data", _sub(self.data, DataGenConfig, "quantizer.data"))
        object.__setattr__(self, "train", _sub(self.train, TrainConfig, "quantizer.train"))
        for key, value, allowed in (("arith", self.arith, ARITHS), ("w_quant", self.w_quant, W_QUANTS),
                                    ("a_quant", self.a_quant, A_QUANTS)):
            if value not in allowed:
                raise ConfigError(f"quantizer.{key}", f"must be one of {allowed}, got {value!r}")
        if self.ste_clip is not None and (isinstance(self.ste_clip, bool) or not isinstance(self.ste_clip, (int, float))
                                          or self.ste_clip <= 0):
            raise ConfigError("quantizer.ste_clip", f"must be null or a number > 0, got {self.ste_clip!r}")
        if isinstance(self.statsq_k, bool) or not isinstance(self.statsq_k, (int, float)) or self.statsq_k <= 0:
            raise ConfigError("quantizer.statsq_k", f"must be a number > 0, got {self.statsq_k!r}")
        if self.train.parallel != "none" and self.a_quant == "lsq" and setting.a_bits < 16:
            raise ConfigError(parallel.KEY, "a_quant=lsq sets each step size from the first batch a process "
                                            "sees, which differs per rank: train it with parallel=none")

    def to_dict(self) -> dict[str, Any]:
        """The settings, without ``train.parallel``: where the sums run changes neither the run's variant
        nor its fingerprint (a 1-process run resumes a torchrun run's checkpoint and vice versa); the
        layout is in the run's summary (``train``, ``train_world_size``) and its resolved config."""
        d = super().to_dict()
        d["data"]["greedy_prefix"] = list(self.data.greedy_prefix)
        d["train"].pop("parallel", None)
        return d


def teacher_fingerprint(model: nn.Module) -> str:
    """Hash of the teacher's config and parameters (names, shapes, float64 sum and absolute sum): keys
    the generated-data cache, so data made by one checkpoint is never reused for another."""
    stats = {n: (list(p.shape), float(p.detach().double().sum()), float(p.detach().double().abs().sum()))
             for n, p in model.named_parameters()}
    cfg = cast(Any, model.config).to_dict() if hasattr(model.config, "to_dict") else str(model.config)
    return fingerprint({"config": cfg, "params": stats})


def _student_file(path: str | Path) -> Path:
    p = Path(path).expanduser()
    p = p / STUDENT_FILE if p.is_dir() else p
    if not p.is_file():
        raise ConfigError("quantizer.load_student", f"no {STUDENT_FILE} at {path}")
    return p


@register_quantizer("llm_qat", LLMQATConfig)
class LLMQATQuantizer(Quantizer[LLMQATConfig]):
    """Data-free QAT: generate with the fp model, swap in fake-quant Linears, distil the fp model into them."""

    applies_wakv = True

    def label(self, model_dtype: str) -> str:
        """``llm_qat w4pcs 4-8-4``, plus every choice that differs from the paper's method (``w:statsq``,
        ``a:lsq``, ``arith:code``, ``ste_clip:2``) or from the reference's sampling of the teacher data
        (``data.top_k:0`` for the full softmax; shown when some tokens are sampled, i.e. unless
        ``data.strategy=greedy``), so tables never pool different variants. The data budget and the
        other data settings are in the run's variant, not in the label."""
        c = self.config
        samples = c.data.strategy != "greedy"
        extra = [f"w:statsq{'' if c.statsq_k == 2.0 else f'{c.statsq_k:g}'}" if c.w_quant == "statsq" else "",
                 f"a:{c.a_quant}" if c.a_quant != "minmax" else "",
                 f"arith:{c.arith}" if c.arith != "paper" else "",
                 f"ste_clip:{c.ste_clip:g}" if c.ste_clip is not None else "",
                 f"data.top_k:{c.data.top_k}" if samples and c.data.top_k != REFERENCE_TOP_K else ""]
        return " ".join([super().label(model_dtype), *filter(None, extra)])

    def validate(self, model: nn.Module) -> None:
        super().validate(model)
        kv_linear_names(model)  # the KV mapping must exist even at KV=16 (fails loudly for unknown models)

    def _data(self, teacher: nn.Module, ctx: RunContext) -> tuple[torch.Tensor, dict[str, Any]]:
        cfg = self.config
        t_fp = teacher_fingerprint(teacher)
        key = fingerprint({"teacher": t_fp, "data": dataclasses.asdict(cfg.data)})
        directory = Path(cfg.data_dir) if cfg.data_dir else results_root() / "cache" / "qat_data" / key[:20]
        t0 = time.perf_counter()
        rows = generate_data(teacher, ctx.tokenizer, cfg.data, directory, meta={"teacher": t_fp})
        n_tok = sum(len(r["ids"]) for r in rows)
        blocks = blocks_from_sequences([r["ids"] for r in rows], cfg.train.seq_len)
        info = {"data_dir": str(directory), "data_sequences": len(rows), "data_tokens": n_tok,
                "data_blocks": int(blocks.shape[0]), "data_wall_s": round(time.perf_counter() - t0, 3),
                "teacher_fingerprint": t_fp[:16]}
        log.info("LLM-QAT data: %d sequences, %d tokens -> %d blocks of %d (%s)", len(rows), n_tok,
                 blocks.shape[0], cfg.train.seq_len, directory)
        return blocks, info

    def quantize(self, model: nn.Module, calib: CalibData | None, ctx: RunContext) -> QuantResult:
        from safetensors.torch import load_model, save_model

        cfg = self.config
        setting = WAKV.parse(cfg.wakv)
        targets = [n for n, _ in self.target_linears(model)]
        kv = kv_linear_names(model) if setting.quantizes_kv else set()
        summary: dict[str, Any] = {"wakv": str(setting), "arith": cfg.arith, "ste_clip": cfg.ste_clip,
                                   "w_quant": cfg.w_quant, "a_quant": cfg.a_quant, "n_layers": len(targets)}
        spec = {"arith": cfg.arith, "ste_clip": cfg.ste_clip, "w_quant": cfg.w_quant, "a_quant": cfg.a_quant,
                "statsq_k": float(cfg.statsq_k)}
        if cfg.load_student:
            if cfg.train.parallel != "none" and parallel.env_rank() > 0:
                raise parallel.FollowerDone  # nothing to train: rank 0 loads, evaluates and records
            path = _student_file(cfg.load_student)
            swap_wakv(model, targets, kv, setting.w_bits, setting.a_bits, setting.kv_bits, **spec)
            load_model(model, str(path), strict=True, device=str(ctx.device))
            summary["loaded_from"] = str(path)
            return self._done(model, targets, summary, setting)

        work = results_root() / "cache" / "qat" / (ctx.run_fingerprint or "unkeyed")[:20]
        final = work / STUDENT_FILE
        teacher = copy.deepcopy(model).eval().requires_grad_(False)
        distributed = cfg.train.parallel != "none"  # under torchrun: rank 0 reads and writes every file
        if distributed:
            parallel.init(ctx.device)
        blocks, info = self._data(teacher, ctx)  # under torchrun: split over the ranks, gathered on all
        summary.update(info)
        swap_wakv(model, targets, kv, setting.w_bits, setting.a_bits, setting.kv_bits, **spec)
        if parallel.broadcast_object(bool(ctx.run_fingerprint and final.is_file())):  # rank 0 decides
            if distributed:
                parallel.shutdown()
                if parallel.env_rank() > 0:
                    raise parallel.FollowerDone
            load_model(model, str(final), strict=True, device=str(ctx.device))
            history = json.loads((work / "history.json").read_text())
            summary.update({"reused_student": str(final), "train_wall_s": None})
            log.info("LLM-QAT: reusing the trained student of an identical run: %s", final)
        else:
            t0 = time.perf_counter()
            history = train_qat(model, teacher, blocks, cfg.train,
                                checkpoint_dir=work if ctx.run_fingerprint else None)
            summary["train_wall_s"] = round(time.perf_counter() - t0, 3)
            if distributed:
                summary["train_world_size"] = parallel.world_size()
                parallel.shutdown()  # every rank together; rank 0 goes on alone (files, evaluation, record)
                if parallel.env_rank() > 0:
                    raise parallel.FollowerDone
            if ctx.run_fingerprint:
                save_model(model, str(final))  # handles tied embeddings / lm_head
                (work / "history.json").write_text(json.dumps(history))
                (work / "qat_checkpoint.pt").unlink(missing_ok=True)  # optimiser states: not needed any more
        del teacher
        summary.update({"student_file": str(final) if ctx.run_fingerprint else None, "train": dataclasses.asdict(cfg.train),
                        "loss_first": history[0]["loss"] if history else None,
                        "loss_last": history[-1]["loss"] if history else None, "steps_done": len(history)})
        result = self._done(model, targets, summary, setting)
        result.tables["qat_loss_curve"] = history
        if history:
            result.images["qat_loss"] = plot_loss_curve(history, ctx.output_dir / "qat_loss.png",
                                                        f"LLM-QAT {setting}: {cfg.train.loss} distillation loss")
        return result

    def _done(self, model: nn.Module, targets: list[str], summary: dict[str, Any], setting: WAKV) -> QuantResult:
        model.eval()
        log.info("LLM-QAT %s (W-A-KV): %d Linears fake-quantized", setting, len(targets))
        quantized = targets if setting.quantizes_weights else []
        return QuantResult(model=model, quantized_layers=quantized, summary=summary)
