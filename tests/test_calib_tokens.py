"""``calib.source=tokens``: calibration ids from a file are used exactly as stored (the same ids another tool
is fed), with the file's hash recorded; every malformed file is one clear error naming the key."""
from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from conftest import compose, run_cli

from quantlab.calib.datasets import CalibConfig, build_calib
from quantlab.errors import ConfigError, DataError
from quantlab.types import tokens_sha256

IDS = torch.randint(0, 259, (6, 32), generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("suffix", [".pt", ".npy"])
def test_rows_are_used_as_stored_and_the_file_is_recorded(tmp_path, suffix):
    path = tmp_path / f"ids{suffix}"
    if suffix == ".npy":
        np.save(path, IDS.numpy().astype(np.int32))  # any integer dtype
    else:
        torch.save(IDS, path)
    data = build_calib(CalibConfig(source="tokens", path=str(path), n_samples=4, seqlen=32), None, vocab_size=259)
    assert data.tokens.dtype == torch.int64 and torch.equal(data.tokens, IDS[:4])
    assert data.sha256 == tokens_sha256(IDS[:4]) and (data.n_samples, data.seqlen, data.name) == (4, 32, "tokens")
    prov = data.provenance
    assert prov["file_sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert prov["file_shape"] == [6, 32] and prov["rows_used"] == 4
    every = build_calib(CalibConfig(source="tokens", path=str(path), n_samples=-1, seqlen=32), None, vocab_size=259)
    assert torch.equal(every.tokens, IDS)


def test_bad_token_files_are_clear_errors(tmp_path):
    def calib(path, n=-1, seqlen=32, vocab=259):
        return build_calib(CalibConfig(source="tokens", path=str(path), n_samples=n, seqlen=seqlen), None, vocab)

    torch.save(IDS, tmp_path / "ok.pt")
    cases = {
        "floats.pt": (IDS.float(), "integers"),
        "flat.pt": (IDS[0], "shape"),
        "dict.pt": ({"ids": IDS}, "not a tensor"),
        "big.pt": (IDS + 300, "vocabulary"),
    }
    for name, (obj, msg) in cases.items():
        torch.save(obj, tmp_path / name)
        with pytest.raises(DataError, match=msg):
            calib(tmp_path / name)
    np.save(tmp_path / "obj.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(DataError, match="cannot read"):  # never unpickled
        calib(tmp_path / "obj.npy")
    with pytest.raises(DataError, match="not found"):
        calib(tmp_path / "missing.pt")
    with pytest.raises(ConfigError, match="calib.path"):
        calib(tmp_path / "ids.txt")
    with pytest.raises(ConfigError, match="calib.seqlen=32"):
        calib(tmp_path / "ok.pt", seqlen=64)
    with pytest.raises(DataError, match="calib.n_samples"):
        calib(tmp_path / "ok.pt", n=7)
    with pytest.raises(ConfigError, match="calib.path"):
        CalibConfig(source="tokens")
    with pytest.raises(ConfigError, match="calib.sampling"):
        CalibConfig(source="tokens", path="x.pt", sampling="documents")


def test_preset_composes():
    cfg = compose(["calib=tokens_file", "calib.path=/data/ids.pt", "calib.seqlen=256"])
    assert (cfg.calib.source, cfg.calib.path, cfg.calib.n_samples, cfg.calib.seqlen) == ("tokens", "/data/ids.pt", -1, 256)


@pytest.mark.slow
def test_cli_gptq_from_a_token_file_equals_the_same_ids_drawn_at_random(tmp_path):
    """The random 8 x 64 calibration saved to a file and fed back gives the same GPTQ perplexity."""
    import json

    ids = torch.randint(0, 259, (8, 64), generator=torch.Generator().manual_seed(0))  # calib=random_8x64's ids
    torch.save(ids, tmp_path / "ids.pt")
    common = ["model=tiny_llama", "quantizer=gptq", "eval=[ppl_local]", "eval.ppl_local.max_windows=2"]
    for args in (["calib=random_8x64", "experiment=r"],
                 ["calib=tokens_file", f"calib.path={tmp_path / 'ids.pt'}", "calib.seqlen=64", "experiment=f"]):
        assert run_cli([*common, *args], tmp_path).returncode == 0
    recs = {json.loads(p.read_text())["experiment"]: json.loads(p.read_text())
            for p in (tmp_path / "results").rglob("result.json")}
    assert recs["r"]["calib"]["sha256"] == recs["f"]["calib"]["sha256"]
    assert recs["r"]["metrics"] == {k: v for k, v in recs["f"]["metrics"].items() if k in recs["r"]["metrics"]}
