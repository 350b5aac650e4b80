"""Importing released MDLM-lineage checkpoints (offline): tiny random weights written in each
upstream layout (Lightning .ckpt with state_dict + EMA, HF repo dir with safetensors / .bin) are
imported, and the imported model's logits equal an independent float64 reference forward of the
upstream DDiT (tests/upstream_fixtures.py). Malicious pickles are refused without running."""

from __future__ import annotations

import json
import math
import os
import sys
import types

import pytest
import torch
from safetensors.torch import save_file
from upstream_fixtures import (
    SIZES,
    reference_logits,
    shadow_params,
    upstream_state_dict,
    with_shadow,
)

from xdlm.builders import build_model
from xdlm.commands.import_ import import_checkpoint
from xdlm.config import ModelConfig
from xdlm.importing import ImportOptions
from xdlm.models.mdlm_dit import MDLMDiT, MDLMDiTConfig
from xdlm.models.safe_pickle import Inert, safe_load
from xdlm.models.upstream import read_hf_dir, read_lightning

V = 61
TOL = 1e-6


def _native(sd: dict, time_input: str = "none", vocab: int = V) -> MDLMDiT:
    from xdlm.models.upstream import backbone_tensors, rename

    cfg = MDLMDiTConfig(vocab, SIZES["layers"], SIZES["d"], SIZES["heads"],
                        cond_dim=SIZES["cond"], time_input=time_input)  # fmt: skip
    model = MDLMDiT(cfg)
    model.load_state_dict(rename(backbone_tensors(sd)))
    return model.double().eval()


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach() - b).norm() / b.norm())


def _inputs(vocab: int = V, B: int = 3, L: int = 9):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (B, L), generator=g)
    return ids, torch.rand(B, generator=g, dtype=torch.float64)


def _upstream_cov_time(t: torch.Tensor, eps: float = 1e-3) -> torch.Tensor:
    """Upstream MDLM's `change_of_variables` time t' whose move chance exp(f_0 + t'(f_T − f_0))
    (f from LogLinearNoise's sigma_min = ε, sigma_max = −log1p(−(1 − ε))) is our 1 − α_t."""
    sigma_max = -torch.log1p(torch.tensor(-(1 - eps), dtype=torch.float64))
    f_T = torch.log1p(-torch.exp(-sigma_max))
    f_0 = torch.log1p(-torch.exp(-torch.tensor(eps, dtype=torch.float64)))
    t_cov = (torch.log((1 - eps) * t) - f_0) / (f_T - f_0)
    assert torch.allclose(torch.exp(f_0 + t_cov * (f_T - f_0)), (1 - eps) * t)
    return t_cov


@pytest.mark.parametrize("time_input", ["none", "sigma", "t"])
def test_native_forward_equals_upstream_reference(time_input):
    sd = upstream_state_dict(V, torch.Generator().manual_seed(0))
    ids, t = _inputs()
    t = t.clamp_min(0.01)  # t' < 0 below (1 - ε)t = m(0) ≈ ε, where "t" clamps at 0
    sigma = {"none": torch.zeros_like(t), "sigma": -torch.log1p(-(1 - 1e-3) * t),
             "t": _upstream_cov_time(t)}  # fmt: skip
    want = reference_logits(sd, ids, sigma[time_input], SIZES["heads"])
    with torch.no_grad():
        got = _native(sd, time_input)(ids, t)
    assert _rel_err(got, want) <= TOL
    if time_input != "none":  # the time input reaches the logits
        with torch.no_grad():
            assert _rel_err(_native(sd, time_input)(ids, t / 2), want) > 1e-3


def test_adaln_applies_without_time_conditioning():
    """With time_input none, the constant c still modulates: zeroing adaLN changes the logits."""
    sd = upstream_state_dict(V, torch.Generator().manual_seed(0))
    ids, t = _inputs()
    zeroed = {k: (torch.zeros_like(v) if "adaLN" in k else v) for k, v in sd.items()}
    with torch.no_grad():
        a, b = _native(sd)(ids, t), _native(zeroed)(ids, t)
    assert _rel_err(a, b) > 1e-2
    assert torch.equal(_native(sd)(ids, t), _native(sd)(ids, None))  # t is ignored


def _write_lightning(path, sd, shadow, extra=None):
    ckpt = {"state_dict": sd, "global_step": 1234, "epoch": 3,
            "ema": {"decay": 0.9999, "num_updates": 77, "shadow_params": shadow},
            "loops": {"fit_loop": {"state_dict": {}}}, **(extra or {})}  # fmt: skip
    torch.save(ckpt, path)


def test_lightning_ckpt_raw_and_ema_weights(tmp_path):
    gen = torch.Generator().manual_seed(0)
    sd = upstream_state_dict(V, gen)
    shadow = shadow_params(sd, gen)
    extra = {"noise.dummy": torch.zeros(1)}  # non-backbone entries (and EMA tail) are ignored
    _write_lightning(tmp_path / "last.ckpt", {**sd, **extra}, shadow + [torch.zeros(1)])
    w = read_lightning(tmp_path / "last.ckpt")
    assert w.step == 1234 and w.ema_meta == {"decay": 0.9999, "num_updates": 77}
    ids, t = _inputs()
    zeros = torch.zeros_like(t)
    for weights, upstream in [(w.weights, sd), (w.ema, with_shadow(sd, shadow))]:
        model = _native(upstream)
        model.load_state_dict(weights)
        want = reference_logits(upstream, ids, zeros, SIZES["heads"])
        with torch.no_grad():
            assert _rel_err(model.double()(ids, t), want) <= TOL


def test_ema_in_wrong_order_is_refused(tmp_path):
    gen = torch.Generator().manual_seed(0)
    sd = upstream_state_dict(V, gen)
    shadow = shadow_params(sd, gen)
    _write_lightning(tmp_path / "bad.ckpt", sd, shadow[::-1])
    with pytest.raises(ValueError, match="does not follow the backbone order"):
        read_lightning(tmp_path / "bad.ckpt")


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_hf_dir_layout(tmp_path, fmt):
    sd = upstream_state_dict(V, torch.Generator().manual_seed(2))
    config = {"model_type": "mdlm", "vocab_size": V, "hidden_dim": SIZES["d"],
              "cond_dim": SIZES["cond"], "n_blocks": SIZES["layers"], "n_heads": SIZES["heads"],
              "model_length": 16, "time_conditioning": False}  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(config))
    if fmt == "safetensors":
        save_file(sd, str(tmp_path / "model.safetensors"))
    else:
        torch.save(sd, tmp_path / "pytorch_model.bin")
    w = read_hf_dir(tmp_path)
    assert w.ema is None and w.hints["model_type"] == "mdlm"
    model = _native(sd)
    model.load_state_dict(w.weights)
    ids, t = _inputs()
    want = reference_logits(sd, ids, torch.zeros_like(t), SIZES["heads"])
    with torch.no_grad():
        assert _rel_err(model.double()(ids, t), want) <= TOL


def test_flat_backbone_layout(tmp_path):
    """A re-upload storing the backbone's own state_dict (no `backbone.` prefix)."""
    sd = upstream_state_dict(V, torch.Generator().manual_seed(3))
    (tmp_path / "config.json").write_text(json.dumps({"n_heads": SIZES["heads"]}))
    save_file(
        {k.removeprefix("backbone."): v for k, v in sd.items()}, str(tmp_path / "model.safetensors")
    )
    model = _native(sd)
    model.load_state_dict(read_hf_dir(tmp_path).weights)
    ids, t = _inputs()
    want = reference_logits(sd, ids, torch.zeros_like(t), SIZES["heads"])
    with torch.no_grad():
        assert _rel_err(model.double()(ids, t), want) <= TOL


def test_unknown_upstream_keys_are_refused(tmp_path):
    sd = upstream_state_dict(V, torch.Generator().manual_seed(0))
    sd["backbone.cond_map.embedding_table.weight"] = torch.zeros(3, SIZES["cond"])
    torch.save({"state_dict": sd}, tmp_path / "cond.ckpt")
    with pytest.raises(ValueError, match="cond_map"):
        read_lightning(tmp_path / "cond.ckpt")


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class _EvalEvil:
    def __reduce__(self):
        return (eval, ("__import__('os').getpid()",))


@pytest.mark.parametrize("payload", ["system", "eval"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, payload):
    marker = tmp_path / "PWNED"
    evil = _Evil(marker) if payload == "system" else _EvalEvil()
    sd = upstream_state_dict(V, torch.Generator().manual_seed(0))
    torch.save({"state_dict": sd, "hyper_parameters": {"x": evil}}, tmp_path / "evil.ckpt")
    with pytest.raises(ValueError, match="refusing to load"):
        safe_load(tmp_path / "evil.ckpt")
    with pytest.raises(ValueError, match="refusing to load"):
        import_checkpoint(str(tmp_path / "evil.ckpt"), tmp_path / "run", ImportOptions(k=0.0))
    assert not marker.exists() and not (tmp_path / "run").exists()


def test_metadata_objects_load_as_inert(tmp_path, monkeypatch):
    """Lightning hyper-parameters (an omegaconf DictConfig here, from a stand-in module so the
    pickle names `omegaconf.dictconfig.DictConfig`) load as Inert; nothing of theirs runs."""
    calls = []

    class DictConfig:
        def __init__(self, content):
            self._content = content

        def __setstate__(self, state):  # would run on a real unpickle; must not run here
            calls.append(state)
            self.__dict__.update(state)

    module = types.ModuleType("omegaconf.dictconfig")
    DictConfig.__module__, DictConfig.__qualname__ = "omegaconf.dictconfig", "DictConfig"
    module.DictConfig = DictConfig
    monkeypatch.setitem(sys.modules, "omegaconf", types.ModuleType("omegaconf"))
    monkeypatch.setitem(sys.modules, "omegaconf.dictconfig", module)
    sd = {"backbone.x": torch.ones(2)}
    torch.save({"state_dict": sd, "hyper_parameters": {"config": DictConfig({"a": 1})}},
               tmp_path / "meta.ckpt")  # fmt: skip
    data = safe_load(tmp_path / "meta.ckpt")
    assert isinstance(data["hyper_parameters"]["config"], Inert)
    assert torch.equal(data["state_dict"]["backbone.x"], torch.ones(2)) and calls == []


def test_import_writes_a_loadable_run(tmp_path, shared_data):
    """End to end with the exact GPT-2 mode: V = 50,258, mask 50,257; load_run gives the EMA
    weights by default and the raw ones with use_ema=False, each equal to the reference."""
    from xdlm.runs import load_run

    vocab = 50_258
    gen = torch.Generator().manual_seed(0)
    sizes = {**SIZES, "layers": 1}
    sd = upstream_state_dict(vocab, gen, sizes)
    shadow = shadow_params(sd, gen)
    _write_lightning(tmp_path / "mdlm.ckpt", sd, shadow)
    opts = ImportOptions(k=0.0, n_heads=SIZES["heads"], seq_len=64,
                         tokenizer_source=str(shared_data / "tokenizers" / "gpt2"))  # fmt: skip
    ckpt = import_checkpoint(str(tmp_path / "mdlm.ckpt"), tmp_path / "run", opts)
    with pytest.raises(ValueError, match="already holds a run"):
        import_checkpoint(str(tmp_path / "mdlm.ckpt"), tmp_path / "run", opts)
    meta = json.loads((ckpt / "meta.json").read_text())
    assert meta["kernel"] == {"vocab_size": vocab, "mask_id": 50_257, "k": 0.0}
    assert meta["schedule"] == {"name": "loglinear", "eps": 1e-3} and meta["step"] == 1234
    ids, t = _inputs(vocab)
    for use_ema, upstream in [(True, with_shadow(sd, shadow)), (False, sd)]:
        loaded = load_run(tmp_path / "run", use_ema=use_ema)
        assert loaded.tokenizer.special_ids == {"bos": 50256, "eos": 50256, "pad": 50256,
                                                "mask": 50257}  # fmt: skip
        want = reference_logits(upstream, ids, torch.zeros_like(t), SIZES["heads"])
        with torch.no_grad():
            assert _rel_err(loaded.model.double()(ids, t), want) <= TOL


def test_import_needs_k_when_the_source_does_not_say(tmp_path):
    sd = upstream_state_dict(V, torch.Generator().manual_seed(0))
    torch.save({"state_dict": sd}, tmp_path / "x.ckpt")
    with pytest.raises(ValueError, match="pass --k"):
        import_checkpoint(str(tmp_path / "x.ckpt"), tmp_path / "run")


def test_builder_mdlm_dit_needs_sizes():
    with pytest.raises(ValueError, match="model.n_layers"):
        build_model(ModelConfig(backbone="mdlm-dit"), 10)
    model = build_model(ModelConfig(backbone="mdlm-dit", n_layers=1, d_model=16, n_heads=2), 10)
    logits = model(torch.zeros(2, 5, dtype=torch.long), torch.rand(2))
    assert logits.shape == (2, 5, 10)  # zero-initialised head: uniform logits at init
    assert torch.allclose(logits.log_softmax(-1), torch.full_like(logits, -math.log(10)))


def test_non_checkpoint_files_are_refused(tmp_path):
    (tmp_path / "junk.ckpt").write_bytes(b"not a checkpoint")
    torch.save({"state_dict": {}}, tmp_path / "old.ckpt", _use_new_zipfile_serialization=False)
    for name in ("junk.ckpt", "old.ckpt"):
        with pytest.raises(ValueError, match="zip-format"):
            safe_load(tmp_path / name)
    with pytest.raises(FileNotFoundError):
        safe_load(tmp_path / "missing.ckpt")


@pytest.mark.parametrize(
    "config, want",
    [  # MDLM / UDLM repos: top-level diffusion + time_conditioning; Duo / XDLM: algo.*
        ({"diffusion": "absorbing_state", "time_conditioning": False,
          "model": {"n_heads": 4, "length": 32}},
         {"model_type": "mdlm", "time_conditioning": False, "n_heads": 4, "model_length": 32}),
        ({"algo": {"name": "xdlm", "time_conditioning": True}, "model": {"n_heads": 4}},
         {"algo": "xdlm", "time_conditioning": True, "n_heads": 4}),
        ({"diffusion": "uniform", "time_conditioning": True,
          "training": {"change_of_variables": True}},
         {"model_type": "udlm", "time_conditioning": True, "change_of_variables": True}),
        ({"algo": {"name": "xdlm", "k1": 0.25}, "training": {"change_of_variables": True}},
         {"algo": "xdlm", "k1": 0.25}),  # Duo / XDLM code never reads the flag
    ],
)  # fmt: skip
def test_lightning_hparams_are_read_as_data(tmp_path, config, want):
    """A real omegaconf DictConfig in hyper_parameters loads inert and is read back as data."""
    omegaconf = pytest.importorskip("omegaconf")
    sd = upstream_state_dict(V, torch.Generator().manual_seed(0))
    hp = {"config": omegaconf.OmegaConf.create(config)}
    torch.save({"state_dict": sd, "hyper_parameters": hp}, tmp_path / "hp.ckpt")
    w = read_lightning(tmp_path / "hp.ckpt")
    assert {k: w.hints[k] for k in want} == want
    if "algo" in config:
        assert "change_of_variables" not in w.hints
    if want.get("model_type") == "mdlm":  # everything the import needs comes from the file
        from xdlm.importing import kernel_k, model_config

        cfg = model_config(w, ImportOptions())
        assert kernel_k(w, ImportOptions()) == 0.0 and cfg.n_heads == 4
        assert cfg.time_input == "none"
    if want.get("algo") == "xdlm" and "k1" not in want:  # k is never guessed for XDLM
        with pytest.raises(ValueError, match="'xdlm'.*pass --k"):
            import_checkpoint(str(tmp_path / "hp.ckpt"), tmp_path / "run")


def test_udlm_hf_dir_imports_as_the_uniform_kernel(tmp_path, shared_data):
    """kuleshov-group/udlm-lm1b's layout: model_type udlm, time-conditioned, BERT V = 30,522,
    L = 128 -> k = 1 without a mask state, time input sigma, the bert-base-uncased tokenizer."""
    from xdlm.runs import load_run

    vocab = 30_522
    sd = upstream_state_dict(vocab, torch.Generator().manual_seed(4), {**SIZES, "layers": 1})
    src = tmp_path / "udlm-lm1b"
    src.mkdir()
    config = {"model_type": "udlm", "vocab_size": vocab, "n_heads": SIZES["heads"],
              "model_length": 128, "time_conditioning": True}  # fmt: skip
    (src / "config.json").write_text(json.dumps(config))
    save_file(sd, str(src / "model.safetensors"))
    opts = ImportOptions(tokenizer_source=str(shared_data / "tokenizers" / "bert-base-uncased"))
    import_checkpoint(str(src), tmp_path / "run", opts)
    run = load_run(tmp_path / "run")
    assert run.kernel.spec() == {"vocab_size": vocab, "mask_id": None, "k": 1.0}
    assert run.config.data.seq_len == 128 and run.config.model.time_input == "sigma"
    assert run.tokenizer.special_ids == {"bos": 101, "eos": 102, "pad": 0, "mask": 103}
    ids, t = _inputs(vocab)
    want = reference_logits(sd, ids, -torch.log1p(-(1 - 1e-3) * t), SIZES["heads"])
    with torch.no_grad():
        assert _rel_err(run.model.double()(ids, t), want) <= TOL


def _ckpt_with_config(path, sd, config):
    omegaconf = pytest.importorskip("omegaconf")
    hp = {"config": omegaconf.OmegaConf.create(config)}
    torch.save({"state_dict": sd, "hyper_parameters": hp}, path)
    return read_lightning(path)


@pytest.mark.parametrize("k1, expected", [(0.25, 0.25), (0, 0.0), (1, 1.0)])
def test_xdlm_k_comes_from_algo_k1(tmp_path, k1, expected):
    from xdlm.importing import kernel_k

    sd = upstream_state_dict(V, torch.Generator().manual_seed(0))
    w = _ckpt_with_config(tmp_path / "x.ckpt", sd, {"algo": {"name": "xdlm", "k1": k1}})
    assert kernel_k(w, ImportOptions()) == expected
    assert kernel_k(w, ImportOptions(k=0.5)) == 0.5  # --k still wins


@pytest.mark.parametrize("k1", [1.5, -0.1, "0.1", True])
def test_a_bad_algo_k1_names_the_value_and_the_fix(tmp_path, k1):
    from xdlm.importing import kernel_k

    sd = upstream_state_dict(V, torch.Generator().manual_seed(0))
    w = _ckpt_with_config(tmp_path / "x.ckpt", sd, {"algo": {"name": "xdlm", "k1": k1}})
    with pytest.raises(ValueError, match=r"algo\.k1=.*not a share in \[0, 1\]; pass --k"):
        kernel_k(w, ImportOptions())


def test_change_of_variables_run_is_conditioned_on_its_own_time(tmp_path):
    """Regression (issue 32): an MDLM run trained with training.change_of_variables conditions
    its network on t' (another schedule's time), not σ; it imported as "sigma" with logits
    ~15 % off. Imported now, the logits equal the upstream forward at t'."""
    from xdlm.importing import model_config

    sd = upstream_state_dict(V, torch.Generator().manual_seed(5))
    config = {
        "diffusion": "absorbing_state",
        "time_conditioning": True,
        "training": {"change_of_variables": True},
        "model": {"n_heads": SIZES["heads"]},
    }
    w = _ckpt_with_config(tmp_path / "cov.ckpt", sd, config)
    assert model_config(w, ImportOptions()).time_input == "t"
    ids, t = _inputs()
    t = t.clamp_min(0.01)
    want = reference_logits(sd, ids, _upstream_cov_time(t), SIZES["heads"])
    with torch.no_grad():
        assert _rel_err(_native(sd, "t")(ids, t), want) <= TOL
        as_sigma = _rel_err(_native(sd, "sigma")(ids, t), want)
    assert as_sigma > 1e-2, as_sigma  # what reading it as σ used to give
    plain = _ckpt_with_config(tmp_path / "plain.ckpt", sd, {**config, "training": {}})
    assert model_config(plain, ImportOptions()).time_input == "sigma"
