"""Every config file composes and builds typed objects; registries and conf/ agree."""
from __future__ import annotations

import pytest
import yaml
from conftest import CONF, compose

from quantlab.cli import build_spec
from quantlab.errors import ConfigError
from quantlab.quantizers.base import QUANTIZERS, quantizer_class

MODELS = sorted(p.stem for p in (CONF / "model").glob("*.yaml"))
# `_base.yaml` holds the fields every method shares; it is a fragment the method YAMLs extend, not a method
QUANTIZER_FILES = sorted(p.stem for p in (CONF / "quantizer").glob("*.yaml") if not p.stem.startswith("_"))
FORMATS = sorted(p.stem for p in (CONF / "quantizer" / "format").glob("*.yaml"))
CALIBS = sorted(p.stem for p in (CONF / "calib").glob("*.yaml"))
EVALS = sorted(p.stem for p in (CONF / "eval").glob("*.yaml"))
LOGGERS = sorted(p.stem for p in (CONF / "logger").glob("*.yaml"))
EXPS = sorted(p.stem for p in (CONF / "exp").glob("*.yaml"))


def test_groups_are_not_empty():
    for group in (MODELS, QUANTIZER_FILES, FORMATS, CALIBS, EVALS, LOGGERS, EXPS):
        assert group, "a config group has no files"


def test_default_config_builds():
    cfg = compose()
    spec = build_spec(cfg)
    assert spec.model.name == "smollm2_135m"
    # SmolLM2 hidden size 576 is not divisible by 128: the default format is w4 g64
    assert spec.quantizer.format.group_size == 64 and spec.quantizer.format.bits == 4
    assert {e.kind for e in spec.evals} == {"perplexity", "layer_error"}


@pytest.mark.parametrize("model", MODELS)
def test_model_configs_build(model):
    spec = build_spec(compose([f"model={model}"]))
    assert spec.model.name == model


# presets named after their format rather than their algorithm (the names): stem -> method
FORMAT_PRESETS = {"nf4_ref": "rtn", "fp4_ref": "rtn"}


@pytest.mark.parametrize("quantizer", QUANTIZER_FILES)
def test_quantizer_configs_build(quantizer):
    spec = build_spec(compose([f"quantizer={quantizer}"]))
    name = quantizer_class(spec.quantizer).name
    if quantizer in FORMAT_PRESETS:
        assert FORMAT_PRESETS[quantizer] == name and spec.quantizer.format.kind == quantizer.split("_")[0]
        return
    assert quantizer == name or quantizer.startswith(name + "_"), "YAML stem must be <name> or <name>_<variant>"


@pytest.mark.parametrize("quantizer", QUANTIZER_FILES)
def test_every_method_yaml_extends_the_base_and_does_not_repeat_it(quantizer):
    """The shared fields come from quantizer/_base.yaml (so sweeps over them compose for every method);
    a method's own YAML holds only its own fields (or a different value, e.g. LLM-QAT's wakv)."""
    cfg = compose([f"quantizer={quantizer}"])
    base = yaml.safe_load((CONF / "quantizer" / "_base.yaml").read_text())
    assert set(base) <= set(cfg.quantizer), f"{quantizer}: lists no _base in its defaults"
    own = yaml.safe_load((CONF / "quantizer" / f"{quantizer}.yaml").read_text())
    assert [k for k in base if k in own and own[k] == base[k]] == [], f"{quantizer} repeats _base's values"


@pytest.mark.parametrize("fmt", FORMATS)
def test_format_configs_build(fmt):
    spec = build_spec(compose(["quantizer=rtn", f"quantizer/format={fmt}"]))
    raw = yaml.safe_load((CONF / "quantizer" / "format" / f"{fmt}.yaml").read_text())
    assert spec.quantizer.format.bits == raw["bits"] and spec.quantizer.format.group_size == raw["group_size"]


REQUIRED = {"tokens_file": ["calib.path=ids.pt"]}  # presets with a value the user must give


@pytest.mark.parametrize("calib", CALIBS)
def test_calib_configs_build(calib):
    spec = build_spec(compose([f"calib={calib}", *REQUIRED.get(calib, [])]))
    assert spec.calib is not None and spec.calib.seqlen > 1
    if calib in REQUIRED:  # without it: one error naming the key
        with pytest.raises(ConfigError, match=REQUIRED[calib][0].split("=")[0]):
            build_spec(compose([f"calib={calib}"]))


@pytest.mark.parametrize("ev", EVALS)
def test_eval_configs_build(ev):
    spec = build_spec(compose([f"eval=[{ev}]"]))
    assert len(spec.evals) == 1 and spec.evals[0].name


@pytest.mark.parametrize("logger", LOGGERS)
def test_logger_configs_build(logger):
    cfg = compose([f"logger={logger}"])
    from hydra.utils import instantiate

    assert instantiate(cfg.logger).kind == logger


@pytest.mark.parametrize("exp", EXPS)
def test_exp_presets_build(exp):
    cfg = compose([f"+exp={exp}"])
    assert cfg.experiment == exp, "every preset names its experiment after its file"
    build_spec(cfg)


def test_every_registered_quantizer_has_a_yaml():
    for name in QUANTIZERS.names():
        assert name in QUANTIZER_FILES or any(f.startswith(name + "_") for f in QUANTIZER_FILES), name


def test_a_module_in_the_package_is_registered_by_existing(tmp_path, monkeypatch):
    """quantizers/ and evals/ import every module below them (no import list to edit); `_`-names are skipped."""
    from quantlab.registry import import_submodules

    pkg = tmp_path / "fakepkg"
    (pkg / "sub").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "mymethod.py").write_text("SEEN = True\n")
    (pkg / "sub" / "__init__.py").write_text("")
    (pkg / "sub" / "myeval.py").write_text("SEEN = True\n")
    (pkg / "_private.py").write_text("raise RuntimeError('a _module must not be imported')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    names = import_submodules("fakepkg", [str(pkg)])
    assert sorted(names) == ["fakepkg.mymethod", "fakepkg.sub", "fakepkg.sub.myeval"]
    assert "hqq" in QUANTIZERS  # the newest method: no import list names it
