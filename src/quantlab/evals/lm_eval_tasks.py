"""Zero-/few-shot accuracy with EleutherAI's lm-evaluation-harness on the in-memory (quantized) model.

The model is wrapped as ``HFLM(pretrained=model, tokenizer=<a copy of the tokenizer>)`` and scored by
``lm_eval.simple_evaluate``: no reload, so fake-quantized Linears are evaluated exactly as the pipeline
left them, and the model is given back unchanged (training flags, parameters, devices, dtypes).

Metrics: ``lm_eval/<task>/<metric>`` (``acc``, ``acc_norm``, ``exact_match``, ...; stderr as
``<metric>_stderr``) for every requested task and group; a group's subtasks (mmlu's subjects) go to the
table ``lm_eval_<name>`` only. A filter name is kept only when a task reports one metric under several
filters (``lm_eval/gsm8k/exact_match/strict-match``). Provenance of each metric: harness and version,
task version, n-shot, limit, documents scored, dataset, batch size, seed, decoding settings.

The real tasks download their data from the Hugging Face Hub (or read a pre-populated HF datasets cache
with ``HF_DATASETS_OFFLINE=1``). quantlab ships tiny made-up offline tasks in ``conf/eval/lm_eval_tasks``
(``eval=lm_eval_local``) that read jsonl files through :func:`load_local_jsonl`.
"""
from __future__ import annotations

import copy
import difflib
import json
import logging
import re
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, ClassVar, NoReturn

import torch
from torch import nn

from quantlab.errors import ConfigError, DataError
from quantlab.evals.base import Evaluator, register_evaluator
from quantlab.types import EvalResult, RunContext
from quantlab.utils.checks import is_int

log = logging.getLogger(__name__)

HARNESS = "lm-eval"
INSTALL_HINT = "pip install 'quantlab[lmeval]' (or pip install 'lm-eval>=0.4.13,<0.5')"
#: task metadata key telling :func:`load_local_jsonl` where the task YAMLs are
TASK_DIR_KEY = "quantlab_task_dir"
#: entries of lm-eval's per-task result dicts that are not metrics
_NOT_METRICS = frozenset({"alias", "name", "samples", "sample_len", "sample_count"})
#: indexing lm-eval's ~15k built-in YAMLs takes ~8 s: one TaskManager per (include dir, defaults) per process
_TASK_MANAGERS: dict[tuple[str | None, bool], Any] = {}


def conf_dir() -> Path:
    """quantlab's config directory: ``quantlab/conf`` in a wheel, the repository's ``conf/`` when editable."""
    pkg = Path(__file__).resolve().parents[1]
    cands = (pkg / "conf", pkg.parents[1] / "conf")
    return next((c for c in cands if (c / "config.yaml").is_file()), cands[-1])


def harness_version() -> str:
    """The installed lm-eval version (package metadata, else ``lm_eval.__version__``)."""
    try:
        return metadata.version("lm_eval")
    except metadata.PackageNotFoundError:
        import lm_eval

        return str(getattr(lm_eval, "__version__", "unknown"))


def load_local_jsonl(data_files: Mapping[str, str] | None = None, **kwargs: Any) -> Any:
    """lm-eval ``custom_dataset`` loader: one jsonl file per split, read without the datasets cache.

    In a task YAML: ``custom_dataset: !function quantlab.evals.lm_eval_tasks.load_local_jsonl`` and
    ``dataset_kwargs: {data_files: {test: data/x.jsonl, train: ...}}``. Relative paths resolve against
    the task YAMLs' directory (``kwargs["quantlab_task_dir"]``, set by :class:`LmEvalTasks`), then the
    current directory, then quantlab's ``conf/eval/lm_eval_tasks``.

    Returns:
        A ``datasets.DatasetDict`` with one split per entry of ``data_files``.

    Raises:
        DataError: no ``data_files``, a missing file, or a line that is not valid JSON.
    """
    import datasets

    if not isinstance(data_files, Mapping) or not data_files:
        raise DataError("load_local_jsonl needs dataset_kwargs.data_files = {split: file.jsonl, ...}")
    bases = [Path(kwargs[TASK_DIR_KEY])] if kwargs.get(TASK_DIR_KEY) else []
    bases += [Path.cwd(), conf_dir() / "eval" / "lm_eval_tasks"]
    splits = {}
    for split, spec in data_files.items():
        path = Path(spec).expanduser()
        if not path.is_absolute():
            path = next((b / path for b in bases if (b / path).is_file()), bases[0] / path)
        if not path.is_file():
            looked = ", ".join(str(b) for b in bases)
            raise DataError(f"lm-eval local task data: no such file '{spec}' (split {split}); "
                            f"looked in {looked}")
        rows = []
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            try:
                rows.extend([json.loads(line)] if line.strip() else [])
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{i}: not valid JSON ({e.msg})") from None
        splits[split] = datasets.Dataset.from_list(rows)
    return datasets.DatasetDict(splits)


@contextmanager
def _model_preserved(model: nn.Module) -> Iterator[None]:
    """Run a block under ``no_grad`` and give the model back exactly as it was.

    HFLM calls ``model.eval()`` and ``model.tie_weights()``; afterwards every module's training flag, every
    parameter object (a re-tie would replace one) and every parameter's device, dtype and
    ``requires_grad`` are restored. An offloaded model (``model.offload``) is checked on its offload
    entries, without reading a weight.
    """
    from compressed_tensors.offload import disable_onloading

    modes = [(m, m.training) for m in model.modules()]
    with disable_onloading():
        params = [(m, n, p, p.device, p.dtype, p.requires_grad)
                  for m in model.modules() for n, p in m._parameters.items() if p is not None]
    try:
        with torch.no_grad():
            yield
    finally:
        with disable_onloading():
            _restore(modes, params)


def _restore(modes: list, params: list) -> None:
    for m, training in modes:
        m.training = training
    for m, n, p, device, dtype, requires_grad in params:
        if m._parameters.get(n) is not p:
            log.warning("lm-eval replaced parameter %s of a %s; restoring it", n, type(m).__name__)
            m._parameters[n] = p
        if (p.device, p.dtype) != (device, dtype):
            log.warning("lm-eval moved a parameter to %s/%s; restoring %s/%s",
                        p.device, p.dtype, device, dtype)
            p.data = p.data.to(device=device, dtype=dtype)
        p.requires_grad_(requires_grad)


def _metric_names(entry: Mapping[str, Any]) -> dict[str, tuple[str, str, float]]:
    """lm-eval's ``{'acc,none': 0.5, ...}`` as ``{quantlab name: (lm-eval key, filter, value)}``.

    Non-numeric values (``"N/A"`` stderr) are dropped; the filter's name is kept only where one metric is
    reported under several filters.
    """
    parsed = []
    for key, value in entry.items():
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        if key in _NOT_METRICS or "," not in key or not numeric:
            continue
        metric, filt = key.split(",", 1)
        parsed.append((metric, metric.removesuffix("_stderr"), filt, key, float(value)))
    filters: dict[str, set[str]] = {}
    for _, base, filt, _, _ in parsed:
        filters.setdefault(base, set()).add(filt)
    return {(metric if len(filters[base]) == 1 else f"{metric}/{filt}"): (key, filt, value)
            for metric, base, filt, key, value in parsed}


def _task_facts(task: str, res: Mapping[str, Any]) -> dict[str, Any]:
    """Version, n-shot, documents scored, dataset and decoding settings of one task or group."""
    subtasks = res.get("group_subtasks") or {}

    def leaves(name: str) -> list[str]:
        return [x for c in subtasks[name] for x in leaves(c)] if name in subtasks else [name]

    counts = [(res.get("n-samples") or {}).get(t) or {} for t in leaves(task)]
    configs = [(res.get("configs") or {}).get(t) or {} for t in leaves(task)]
    paths = sorted({str(c.get("dataset_path")) for c in configs})
    names = sorted({str(c.get("dataset_name")) for c in configs if c.get("dataset_name")})
    facts: dict[str, Any] = {
        "task": task,
        "task_version": (res.get("versions") or {}).get(task),
        "n_shot": (res.get("n-shot") or {}).get(task),
        "n_samples": sum(int(c.get("effective", 0)) for c in counts),
        "n_samples_total": sum(int(c.get("original", 0)) for c in counts),
        "dataset_path": paths[0] if len(paths) == 1 else paths,
        "dataset_name": names[0] if len(names) == 1 else None,  # mmlu: one config per subject
    }
    if task in subtasks:
        facts["subtasks"] = list(subtasks[task])
    if len(configs) == 1:
        cfg = configs[0]
        facts["output_type"] = cfg.get("output_type")
        facts["split"] = cfg.get("test_split") or cfg.get("validation_split")
        if isinstance(files := (cfg.get("dataset_kwargs") or {}).get("data_files"), Mapping):
            facts["data_files"] = dict(files)
        if cfg.get("output_type") == "generate_until":
            facts["generation_kwargs"] = cfg.get("generation_kwargs")
    return facts


def _dataset_of(tm: Any, name: str, depth: int = 0) -> str | None:
    """``dataset_path[/dataset_name]`` of a task, or of a group's / tag's first task (for error messages)."""
    entry = tm.task_index.get(name)
    cfg: Any = getattr(entry, "cfg", None) or {}
    if cfg.get("dataset_path"):
        return "/".join(str(cfg[k]) for k in ("dataset_path", "dataset_name") if cfg.get(k))
    children = cfg.get("task") if isinstance(cfg.get("task"), list) else []
    if entry is not None and not cfg:  # a tag: the tasks carrying it
        children = [n for n, e in tm.task_index.items() if name in getattr(e, "tags", ())]
    for child in children if depth < 4 else []:
        if isinstance(child, str) and (found := _dataset_of(tm, child, depth + 1)):
            return found
    return None


@register_evaluator("lm_eval")
@dataclass(frozen=True)
class LmEvalTasks(Evaluator):
    """lm-evaluation-harness tasks on the in-memory model.

    Attributes:
        tasks: lm-eval task, group or tag names (``boolq``, ``mmlu``, ``quantlab_tiny_mc``, ...).
        num_fewshot: n-shot for every task, a ``{task: n}`` map (others: their default), or ``None``
            (each task's default, 0 where it sets none). lm-eval keeps 0 where a task YAML pins 0.
        limit: score only the first ``limit`` documents of each (sub)task (an int) or that fraction (a
            float in (0, 1)); ``None``: all. For quick looks; recorded with every metric.
        batch_size: HFLM batch size: an int, ``"auto"`` or ``"auto:N"``.
        include_path: a directory of extra task YAMLs; a relative path resolves against the current
            directory, then quantlab's config dir (``eval/lm_eval_tasks``: the shipped tiny tasks).
        max_length: HFLM context length (``None``: from the model config).
        log_samples: keep per-document prompts/outputs and write them to
            ``<run dir>/lm_eval_samples/<name>/<task>.jsonl`` (memory-hungry on full tasks).
        bootstrap_iters: lm-eval's stderr iterations (0: no stderr; mean metrics use a closed form).
        seed: lm-eval's python/numpy/torch/few-shot seed (``None``: the run's seed).
        apply_chat_template: format prompts with the tokenizer's chat template.
    """

    tasks: tuple[str, ...] = ()
    num_fewshot: int | dict[str, int] | None = None
    limit: int | float | None = None
    batch_size: int | str = 1
    include_path: str | None = None
    max_length: int | None = None
    log_samples: bool = False
    bootstrap_iters: int = 100000
    seed: int | None = None
    apply_chat_template: bool = False

    execution_fields: ClassVar[tuple[str, ...]] = ("log_samples", "bootstrap_iters")  # stderr only

    def _key(self, field_name: str) -> str:
        return f"eval.{self.name or 'lm_eval'}.{field_name}"

    def _fail(self, field_name: str, message: str) -> NoReturn:
        raise ConfigError(self._key(field_name), message)

    def __post_init__(self) -> None:
        tasks = (self.tasks,) if isinstance(self.tasks, str) else tuple(self.tasks or ())
        named = all(isinstance(t, str) and t.strip() for t in tasks)
        if not tasks or not named or len(set(tasks)) < len(tasks):
            self._fail("tasks", f"must be a non-empty list of distinct task names, got {self.tasks!r}")
        object.__setattr__(self, "tasks", tasks)
        shots = self.num_fewshot
        if isinstance(shots, Mapping):
            if extra := sorted(set(shots) - set(tasks)):
                self._fail("num_fewshot", f"names tasks that are not in tasks: {extra}")
            object.__setattr__(self, "num_fewshot", dict(shots))
        values = shots.values() if isinstance(shots, Mapping) else [0 if shots is None else shots]
        if any(not is_int(v) or v < 0 for v in values):
            self._fail("num_fewshot", f"must be an integer >= 0, a {{task: n}} map or null, got {shots!r}")
        lim = self.limit
        if lim is not None and not ((is_int(lim) and lim >= 1) or (isinstance(lim, float) and 0 < lim < 1)):
            self._fail("limit", f"must be an integer >= 1, a fraction in (0, 1) or null, got {lim!r}")
        bs = self.batch_size
        auto = isinstance(bs, str) and re.fullmatch(r"auto(:\d+(\.\d+)?)?", bs) is not None
        if not auto and (not is_int(bs) or bs < 1):
            self._fail("batch_size", f"must be a positive integer, 'auto' or 'auto:N', got {bs!r}")
        if self.max_length is not None and (not is_int(self.max_length) or self.max_length < 2):
            self._fail("max_length", f"must be an integer >= 2 or null, got {self.max_length!r}")
        if not is_int(self.bootstrap_iters) or self.bootstrap_iters < 0:
            self._fail("bootstrap_iters", f"must be an integer >= 0, got {self.bootstrap_iters!r}")
        if self.seed is not None and not is_int(self.seed):
            self._fail("seed", f"must be an integer or null, got {self.seed!r}")
        for name in ("log_samples", "apply_chat_template"):
            if not isinstance(getattr(self, name), bool):
                self._fail(name, f"must be true or false, got {getattr(self, name)!r}")
        self.include_dir()  # fails early on a missing directory

    def include_dir(self) -> Path | None:
        """The include directory, resolved: absolute, else under the current directory, else the conf dir."""
        if self.include_path is None:
            return None
        if not isinstance(self.include_path, str) or not self.include_path.strip():
            self._fail("include_path", f"must be a directory or null, got {self.include_path!r}")
        spec = Path(self.include_path).expanduser()
        cands = [spec] if spec.is_absolute() else [Path.cwd() / spec, conf_dir() / spec]
        found = next((c for c in cands if c.is_dir()), None)
        if found is None:
            looked = ", ".join(str(c) for c in cands)
            self._fail("include_path", f"no such directory '{self.include_path}' (looked at {looked})")
        return found.resolve()

    def _task_manager(self, include: Path | None, defaults: bool) -> Any:
        """A cached ``TaskManager`` over ``include`` and, with ``defaults``, lm-eval's own tasks."""
        from lm_eval.tasks import TaskManager

        if not hasattr(TaskManager, "load"):  # TaskManager.load / Entry-based index: lm-eval 0.4.13
            self._fail("_target_", f"needs lm-eval >= 0.4.13, found {harness_version()}; {INSTALL_HINT}")
        key = (str(include) if include else None, defaults)
        if key not in _TASK_MANAGERS:
            where = (["built-in"] if defaults else []) + ([key[0]] if key[0] else [])
            log.info("lm-eval: indexing tasks (%s)", " + ".join(where))
            meta = {TASK_DIR_KEY: key[0]} if key[0] else None
            _TASK_MANAGERS[key] = TaskManager(include_path=key[0], include_defaults=defaults, metadata=meta)
        return _TASK_MANAGERS[key]

    def _load_tasks(self) -> tuple[Any, dict[str, list[Any]]]:
        """Index and build the tasks: ``(task_manager, {name: [Task | Group, ...]})`` (a tag: its tasks).

        Raises:
            ConfigError: an unknown task name (close matches are suggested).
            DataError: a task's dataset does not load (e.g. offline without a cache).
        """
        include = self.include_dir()
        tm = self._task_manager(include, defaults=False) if include else None
        if tm is None or any(t not in tm.all_tasks for t in self.tasks):  # only then index the built-ins
            tm = self._task_manager(include, defaults=True)
        if unknown := [t for t in self.tasks if t not in tm.all_tasks]:
            close = {t: difflib.get_close_matches(t, tm.all_tasks, n=3) for t in unknown}
            where = f" nor in {include}" if include else ""
            self._fail("tasks", f"unknown lm-eval task(s) {unknown}: not among lm-eval {harness_version()}'s "
                       f"tasks{where} (close matches: {close}; `lm-eval ls tasks`)")
        built: dict[str, list[Any]] = {}
        for t in self.tasks:
            try:
                loaded = tm.load([t])
            except DataError:
                raise
            except Exception as e:  # hub/datasets errors: one line naming the task, not a traceback
                raise DataError(self._load_error(tm, t, e)) from e
            top = loaded["groups"].get(t) or loaded["tasks"].get(t)
            built[t] = [top] if top is not None else list(loaded["tasks"].values())
        return tm, built

    def _load_error(self, tm: Any, task: str, exc: Exception) -> str:
        """One-line message for a task whose dataset does not load."""
        dataset = _dataset_of(tm, task) or "?"
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        return (f"{self._key('tasks')}: lm-eval task '{task}' cannot load its dataset '{dataset}' "
                f"({type(exc).__name__}: {first}). The real lm-eval tasks need the Hugging Face Hub or a "
                "pre-populated HF datasets cache (run once online; later runs may set "
                "HF_DATASETS_OFFLINE=1). Offline? Use eval=lm_eval_local (quantlab's tiny local tasks)")

    def preflight(self) -> None:
        """Build the tasks before quantizing: an unknown task or an unreachable dataset fails early."""
        self._load_tasks()

    def run(self, model: nn.Module, tokenizer: Any, ctx: RunContext) -> EvalResult:
        """Evaluate the tasks with ``lm_eval.simple_evaluate`` on ``HFLM(pretrained=model)``.

        Args:
            model: a transformers causal LM (possibly with fake-quantized Linears); left unchanged.
            tokenizer: its tokenizer (``ctx.tokenizer`` when ``None``); lm-eval gets a copy.
            ctx: run context (seed; ``output_dir`` for ``log_samples``).

        Returns:
            ``EvalResult`` with ``lm_eval/<task>/<metric>`` metrics, their provenance and the table
            ``lm_eval_<name>`` (one row per task, group and subtask).

        Raises:
            ConfigError: lm-eval is missing, the model is not a transformers model, or a task is unknown.
            DataError: a task's dataset cannot be loaded.
        """
        try:
            import lm_eval
            from lm_eval.models.huggingface import HFLM
        except ImportError as e:
            self._fail("_target_", f"needs the lm-eval package ({e}); {INSTALL_HINT}")
        tokenizer = tokenizer if tokenizer is not None else ctx.tokenizer
        if getattr(model, "config", None) is None or tokenizer is None:
            self._fail("_target_", "lm-eval needs a transformers model and its tokenizer")
        tm, built = self._load_tasks()
        seed = ctx.seed if self.seed is None else self.seed
        by_shots: dict[int | None, list[Any]] = {}  # one simple_evaluate call per n-shot
        for t in self.tasks:
            shots = self.num_fewshot.get(t) if isinstance(self.num_fewshot, Mapping) else self.num_fewshot
            by_shots.setdefault(shots, []).extend(built[t])
        parts = []
        with _model_preserved(model):
            lm = HFLM(pretrained=model, tokenizer=copy.deepcopy(tokenizer), batch_size=self.batch_size,
                      max_length=self.max_length)
            for shots, objs in by_shots.items():
                log.info("lm-eval %s: %d task(s), num_fewshot=%s, limit=%s",
                         self.name, len(objs), shots, self.limit)
                parts.append(lm_eval.simple_evaluate(
                    model=lm, tasks=objs, num_fewshot=shots, limit=self.limit, batch_size=self.batch_size,
                    task_manager=tm, log_samples=self.log_samples, bootstrap_iters=self.bootstrap_iters,
                    apply_chat_template=self.apply_chat_template, random_seed=seed, numpy_random_seed=seed,
                    torch_random_seed=seed, fewshot_random_seed=seed))
            max_length = lm.max_length
        res: dict[str, dict[str, Any]] = {}
        for part in parts:
            for key in ("results", "group_subtasks", "configs", "versions", "n-shot", "n-samples", "samples"):
                res.setdefault(key, {}).update(part.get(key) or {})
        if self.log_samples:
            self._write_samples(res["samples"], Path(ctx.output_dir))
        common = {
            "harness": HARNESS, "harness_version": harness_version(), "limit": self.limit,
            "batch_size": self.batch_size, "max_length": max_length, "seed": seed,
            "bootstrap_iters": self.bootstrap_iters, "apply_chat_template": self.apply_chat_template,
            "include_path": self.include_path, "tokenizer": getattr(tokenizer, "name_or_path", ""),
        }
        return self._collect(res, common)

    def _collect(self, res: Mapping[str, Any], common: dict[str, Any]) -> EvalResult:
        """Flatten lm-eval's results: metrics of requested tasks/groups, their provenance, one table."""
        parent = {c: g for g, children in (res.get("group_subtasks") or {}).items() for c in children}
        out, rows = EvalResult(), []
        for task, entry in (res.get("results") or {}).items():
            prov = {**common, **_task_facts(task, res)}
            names = _metric_names(entry)
            rows.append({"task": task, "group": parent.get(task, ""), "version": prov["task_version"],
                         "n_shot": prov["n_shot"], "n_samples": prov["n_samples"],
                         **{n: v for n, (_, _, v) in names.items()}, "dataset": prov["dataset_path"]})
            if task in parent:
                continue  # a group's subtask: table only
            for name, (key, filt, value) in names.items():
                metric = f"lm_eval/{task}/{name}"
                out.metrics[metric] = value
                extra = {"lm_eval_key": key, **({"filter": filt} if filt != "none" else {})}
                out.provenance[metric] = {**prov, **extra}
                if not name.endswith("_stderr"):
                    log.info("%s = %.4f (%s-shot, %d docs)", metric, value, prov["n_shot"], prov["n_samples"])
        out.tables[f"lm_eval_{self.name or 'lm_eval'}"] = rows
        return out

    def _write_samples(self, samples: Mapping[str, list[dict[str, Any]]], output_dir: Path) -> None:
        """Per-document prompts and outputs as ``<output_dir>/lm_eval_samples/<name>/<task>.jsonl``."""
        root = output_dir / "lm_eval_samples" / (self.name or "lm_eval")
        root.mkdir(parents=True, exist_ok=True)
        for task, docs in samples.items():
            lines = (json.dumps(d, default=str, ensure_ascii=False) + "\n" for d in docs)
            (root / f"{task}.jsonl").write_text("".join(lines), encoding="utf-8")
        log.info("lm-eval samples written to %s", root)
