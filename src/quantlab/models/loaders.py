"""Model zoo: typed model configs and the loaders behind them.

Three sources share one config type so ``model.path=/local/dir`` works for every preset:
  * ``hf``: ``AutoModelForCausalLM.from_pretrained(hub_id, revision=...)`` (needs hub access or a
    populated HF cache); with ``path`` set, a local HF folder instead.
  * ``tiny``: :func:`quantlab.models.tiny.build_tiny_llama` (built in code, offline).
  * ``smollm2_gguf``: the demo model from a PyPI wheel (:mod:`quantlab.models.smollm2`).
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from quantlab.deploy.load import load_packed, packed_quant_config
from quantlab.errors import ConfigError, DataError
from quantlab.models.offload import MODES as OFFLOAD_MODES
from quantlab.models.offload import disk_bytes, offload_folder, offloaded_loading, remove_with
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
        device_map: passed to ``from_pretrained`` (e.g. ``auto`` to shard a 70B model over the GPUs
            present; the calibration engine then computes each block on the GPU holding it); overrides device.
        offload: ``null`` (weights in memory) | ``disk``: every weight stays in ``offload_folder`` and the
            calibration engine reads one decoder block at a time (:mod:`quantlab.models.offload`), for
            models larger than memory; same results bit for bit, slower. Not recorded in the variant.
        offload_folder: where offloaded (and, after quantization, the quantized) tensors live; ``null``: a
            new folder under the quantlab cache, deleted at the end of the run. It needs the model's size
            free on disk.
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
    offload: str | None = None
    offload_folder: str | None = None
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
        if self.offload is not None:
            if self.offload not in OFFLOAD_MODES:
                raise ConfigError("model.offload", f"must be null or one of {OFFLOAD_MODES}, got {self.offload!r}")
            if self.device_map not in (None, "auto"):  # auto: the multi-GPU presets' default, replaced by disk
                raise ConfigError("model.offload", "offload=disk places every weight itself: set model.device_map=null")
            if self.path is not None and packed_quant_config(Path(self.path).expanduser()) is not None:
                raise ConfigError("model.offload", f"{self.path} is a packed low-bit checkpoint: load it in memory")


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
        model = AutoModelForCausalLM.from_pretrained(cast(str, cfg.hub_id), dtype=dtype, device_map=device_map,
                                                     **kw, **extra)
    except OSError as e:
        raise DataError(
            f"model.hub_id: cannot load {cfg.hub_id!r} from the Hugging Face Hub ({str(e).splitlines()[0][:160]}). "
            f"Offline? Download it elsewhere and pass model.path=/local/hf/folder"
        ) from e
    return model, tok


def _tiny_through_loader(cfg: ModelConfig, dtype: Any, device_map: Any, extra: dict[str, Any],
                         keep_in: Path | None = None) -> nn.Module:
    """The tiny model built in code, saved to a folder and loaded back through ``from_pretrained`` so
    load-time quantization (bitsandbytes) and offloading apply to it as to a real model. The folder
    is temporary, or ``keep_in`` (offloaded weights keep pointing at the saved checkpoint)."""
    import tempfile

    from transformers import AutoModelForCausalLM

    from quantlab.models.tiny import build_tiny_llama

    built, _ = build_tiny_llama(dtype=dtype if dtype != "auto" else torch.float32, **cfg.tiny)
    with contextlib.ExitStack() as stack:
        tmp = keep_in or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="quantlab-tiny-")))
        built.save_pretrained(tmp)
        del built
        return AutoModelForCausalLM.from_pretrained(tmp, dtype=dtype, device_map=device_map, **extra)


def _load_source(cfg: ModelConfig, dtype: Any, device: torch.device, device_map: Any, extra: dict[str, Any],
                 origin: dict[str, Any], offload_dir: Path | None) -> tuple[nn.Module, Any]:
    """The model and tokenizer from the configured source (``origin`` gets where they came from)."""
    if cfg.path is not None:
        folder = Path(cfg.path).expanduser()
        if packed_quant_config(folder) is not None:  # an exported low-bit checkpoint: packed layers
            if extra:
                raise ConfigError("quantizer", f"{folder} is already quantized: use quantizer=none")
            from transformers import AutoTokenizer

            model, meta = load_packed(folder, torch.float32 if dtype == "auto" else dtype, device,
                                      cfg.trust_remote_code)
            origin.update(meta, path=str(folder))
            return model, AutoTokenizer.from_pretrained(folder)
        origin["path"] = str(folder)
        return _from_folder(folder, cfg, dtype, device_map, **extra)
    if cfg.source == "tiny":
        from quantlab.models.tiny import build_tiny_llama, byte_tokenizer

        if extra:
            keep = offload_dir / "checkpoint" if offload_dir is not None else None
            return _tiny_through_loader(cfg, dtype, device_map, extra, keep), byte_tokenizer()
        return build_tiny_llama(dtype=dtype if dtype != "auto" else torch.float32, **cfg.tiny)
    if cfg.source == "smollm2_gguf":
        from quantlab.models.smollm2 import ensure_smollm2

        folder = ensure_smollm2(cache_dir())
        origin["path"] = str(folder)
        return _from_folder(folder, cfg, dtype, device_map, **extra)
    return _from_hub(cfg, dtype, device_map, **extra)


def _check_placement(model: nn.Module) -> None:
    """A ``device_map`` that put part of the model on the CPU or disk next to GPUs (accelerate's offload
    hooks) is refused: the calibration engine moves blocks itself; ``model.offload=disk`` is its way."""
    placed = {str(v) for v in (getattr(model, "hf_device_map", None) or {}).values()}
    if "disk" in placed or ("cpu" in placed and placed - {"cpu"}):
        raise ConfigError("model.device_map", f"the model did not fit on the GPUs ({sorted(placed)}): accelerate "
                                              "offloaded part of it; use model.offload=disk model.device_map=null")


def _n_params(model: nn.Module) -> int:
    """Parameters (shapes only: an offloaded model is not read) + the weights of packed low-bit layers."""
    from compressed_tensors.offload import disable_onloading

    with disable_onloading():
        n = sum(p.numel() for p in model.parameters())
    return n + sum(cast(Any, m).in_features * cast(Any, m).out_features
                   for m in model.modules() if hasattr(m, "weight_packed"))


def load_model(cfg: ModelConfig, quantization_config: Any = None) -> LoadedModel:
    """Load the configured model and tokenizer; the model is returned in eval mode on its device.

    ``quantization_config`` (e.g. transformers' ``BitsAndBytesConfig``) is passed to
    ``from_pretrained``: the weights are quantized while loading, placed on ``cfg.device`` through a
    device map (quantized models cannot be moved with ``.to`` afterwards).
    """
    dtype = resolve_dtype(cfg.dtype)
    device = resolve_device(cfg.device)
    device_map: str | dict[str, str] | None = cfg.device_map
    extra: dict[str, Any] = {}
    if quantization_config is not None:
        extra["quantization_config"] = quantization_config
        if device_map is None:
            device_map = {"": str(device)}
    loading: Any = contextlib.nullcontext()
    offload_dir, remove_offload = None, False
    if cfg.offload is not None:
        if quantization_config is not None:
            raise ConfigError("model.offload", "cannot offload a model quantized while loading (bitsandbytes)")
        offload_dir, remove_offload = offload_folder(cfg.offload_folder)
        device_map, extra["offload_folder"], loading = "disk", str(offload_dir), offloaded_loading()
    t0 = time.perf_counter()
    origin: dict[str, Any] = {}
    with loading:
        model, tok = _load_source(cfg, dtype, device, device_map, extra, origin, offload_dir)
    if offload_dir is not None:
        origin["offload"] = {"mode": cfg.offload, "folder": str(offload_dir), "model_bytes": disk_bytes(model)}
        if remove_offload:
            remove_with(model, offload_dir)
    if device_map is None:
        model = model.to(device)
    if cfg.offload is None:
        _check_placement(model)
    model.eval()
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    info = {
        **asdict(cfg),
        **origin,
        "arch": type(model).__name__,
        "n_params": _n_params(model),
        "device": str(device) if device_map is None or not cfg.device_map else f"device_map={device_map}",
        "load_s": round(time.perf_counter() - t0, 3),
        "commit_hash": getattr(model.config, "_commit_hash", None),
    }
    if cfg.offload is not None:
        info["device"] = f"{device}, weights offloaded to {cfg.offload}"
    if cfg.source != "tiny":
        info.pop("tiny", None)
    log.info("loaded %s (%s, %.1fM params) in %.1fs", cfg.name, info["arch"], info["n_params"] / 1e6, info["load_s"])
    return LoadedModel(model=model, tokenizer=tok, device=device, info=info)
