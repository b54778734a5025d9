"""Model zoo: typed model configs and the loaders behind them.

Three sources share one config type so ``model.path=/local/dir`` works for every preset:
  * ``hf``: ``AutoModelForCausalLM.from_pretrained(hub_id, revision=...)`` (needs hub access or a
    populated HF cache); with ``path`` set, a local HF folder instead.
  * ``tiny``: :func:`quantlab.models.tiny.build_tiny_llama` (built in code, offline).
  * ``smollm2_gguf``: the demo model from a PyPI wheel (:mod:`quantlab.models.smollm2`).
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantlab.deploy.load import load_packed, packed_quant_config
from quantlab.errors import ConfigError, DataError
from quantlab.utils.paths import cache_dir
from quantlab.utils.torch_utils import resolve_device, resolve_dtype

log = logging.getLogger(__name__)

SOURCES = ("hf", "tiny", "smollm2_gguf")


@dataclass(frozen=True)
class ModelConfig:
    """Which model to load and how.

    Attributes:
        name: short label used in tables (e.g. ``codellama_34b``).
        source: ``hf`` | ``tiny`` | ``smollm2_gguf``.
        hub_id: Hugging Face model id (``hf`` source).
        path: local HF folder; when set it is loaded instead of ``hub_id``/the built-in source. A folder
            exported by ``python -m quantlab.export`` (or any compressed-tensors / GPTQ v1 / AWQ GEMM
            checkpoint) loads with packed low-bit layers (:mod:`quantlab.deploy.load`; ``deploy.backend``
            picks their kernel); run it with ``quantizer=none``.
        revision: hub revision (commit/tag) for reproducibility.
        dtype: parameter dtype (float32 | float16 | bfloat16 | float64 | auto).
        device: ``cpu`` | ``cuda`` | ``cuda:N`` | ``auto``.
        device_map: passed to ``from_pretrained`` (e.g. ``auto`` to shard a 70B model); overrides device.
        trust_remote_code: passed to ``from_pretrained``.
        note: caveat recorded with every metric of this model (e.g. dequantized GGUF weights).
        code_protocol: the code evaluators' default prompt protocol for this model (``plain`` for base
            models, ``instruct`` for chat/instruct models; see :mod:`quantlab.evals.code.protocols`);
            the eval configs read it as ``${oc.select:model.code_protocol,plain}``.
        tiny: keyword arguments of :func:`build_tiny_llama` (``tiny`` source).
    """

    name: str
    source: str = "hf"
    hub_id: str | None = None
    path: str | None = None
    revision: str | None = None
    dtype: str = "float16"
    device: str = "auto"
    device_map: str | None = None
    trust_remote_code: bool = False
    note: str = ""
    code_protocol: str = "plain"
    tiny: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ConfigError("model.source", f"must be one of {SOURCES}, got {self.source!r}")
        if self.source == "hf" and not (self.hub_id or self.path):
            raise ConfigError("model.hub_id", "an hf model needs hub_id or path")
        if self.path is not None and not Path(self.path).expanduser().is_dir():
            raise ConfigError("model.path", f"{self.path} is not a directory (expected a Hugging Face model folder)")
        resolve_dtype(self.dtype)


@dataclass
class LoadedModel:
    """A model ready for quantization: stock HF module, its tokenizer and facts for the record."""

    model: nn.Module
    tokenizer: Any
    device: torch.device
    info: dict[str, Any]


def _from_folder(folder: Path, cfg: ModelConfig, dtype: Any, device_map: Any, **extra: Any) -> tuple[nn.Module, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype, device_map=device_map, trust_remote_code=cfg.trust_remote_code, **extra
        )
    except (OSError, ValueError) as e:
        raise DataError(f"model.path: cannot load a Hugging Face model from {folder}: {str(e).splitlines()[0]}") from e
    return model, tok


def _from_hub(cfg: ModelConfig, dtype: Any, device_map: Any, **extra: Any) -> tuple[nn.Module, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = dict(revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
    try:
        tok = AutoTokenizer.from_pretrained(cfg.hub_id, **kw)
        model = AutoModelForCausalLM.from_pretrained(cfg.hub_id, dtype=dtype, device_map=device_map, **kw, **extra)
    except OSError as e:
        raise DataError(
            f"model.hub_id: cannot load {cfg.hub_id!r} from the Hugging Face Hub ({str(e).splitlines()[0][:160]}). "
            f"Offline? Download it elsewhere and pass model.path=/local/hf/folder"
        ) from e
    return model, tok


def _tiny_through_loader(cfg: ModelConfig, dtype: Any, device_map: Any, extra: dict[str, Any]) -> nn.Module:
    """The tiny model built in code, saved to a temporary folder and loaded back through
    ``from_pretrained`` so load-time quantization (bitsandbytes) applies to it as to a real model."""
    import tempfile

    from transformers import AutoModelForCausalLM

    from quantlab.models.tiny import build_tiny_llama

    built, _ = build_tiny_llama(dtype=dtype if dtype != "auto" else torch.float32, **cfg.tiny)
    with tempfile.TemporaryDirectory(prefix="quantlab-tiny-") as tmp:
        built.save_pretrained(tmp)
        return AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype, device_map=device_map, **extra)


def load_model(cfg: ModelConfig, quantization_config: Any = None) -> LoadedModel:
    """Load the configured model and tokenizer; the model is returned in eval mode on its device.

    ``quantization_config`` (e.g. transformers' ``BitsAndBytesConfig``) is passed to
    ``from_pretrained``: the weights are quantized while loading, placed on ``cfg.device`` through a
    device map (quantized models cannot be moved with ``.to`` afterwards).
    """
    dtype = resolve_dtype(cfg.dtype)
    device = resolve_device(cfg.device)
    device_map = cfg.device_map
    extra: dict[str, Any] = {}
    if quantization_config is not None:
        extra["quantization_config"] = quantization_config
        if device_map is None:
            device_map = {"": str(device)}
    t0 = time.perf_counter()
    origin: dict[str, Any] = {}
    if cfg.path is not None:
        folder = Path(cfg.path).expanduser()
        if packed_quant_config(folder) is not None:  # an exported low-bit checkpoint: packed layers
            if extra:
                raise ConfigError("quantizer", f"{folder} is already quantized: use quantizer=none")
            from transformers import AutoTokenizer

            model, origin = load_packed(folder, torch.float32 if dtype == "auto" else dtype, device,
                                        cfg.trust_remote_code)
            tok = AutoTokenizer.from_pretrained(folder)
        else:
            model, tok = _from_folder(folder, cfg, dtype, device_map, **extra)
        origin["path"] = str(folder)
    elif cfg.source == "tiny":
        from quantlab.models.tiny import build_tiny_llama, byte_tokenizer

        if extra:
            model, tok = _tiny_through_loader(cfg, dtype, device_map, extra), byte_tokenizer()
        else:
            model, tok = build_tiny_llama(dtype=dtype if dtype != "auto" else torch.float32, **cfg.tiny)
    elif cfg.source == "smollm2_gguf":
        from quantlab.models.smollm2 import ensure_smollm2

        folder = ensure_smollm2(cache_dir())
        model, tok = _from_folder(folder, cfg, dtype, device_map, **extra)
        origin["path"] = str(folder)
    else:
        model, tok = _from_hub(cfg, dtype, device_map, **extra)
    if device_map is None:
        model = model.to(device)
    model.eval()
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    info = {
        **asdict(cfg),
        **origin,
        "arch": type(model).__name__,
        "n_params": sum(p.numel() for p in model.parameters())  # + the weights of packed low-bit layers
        + sum(m.in_features * m.out_features for m in model.modules() if hasattr(m, "weight_packed")),
        "device": str(device) if device_map is None or not cfg.device_map else f"device_map={device_map}",
        "load_s": round(time.perf_counter() - t0, 3),
        "commit_hash": getattr(model.config, "_commit_hash", None),
    }
    if cfg.source != "tiny":
        info.pop("tiny", None)
    log.info("loaded %s (%s, %.1fM params) in %.1fs", cfg.name, info["arch"], info["n_params"] / 1e6, info["load_s"])
    return LoadedModel(model=model, tokenizer=tok, device=device, info=info)
