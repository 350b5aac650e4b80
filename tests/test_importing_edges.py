"""Edges of `xdlm.importing` (issue 29): which source is read how (a Hub id is downloaded, an
id-less path refused), what wins where options and the source disagree, the limits of seq_len,
the EMA's recorded decay and count, every refusal word for word."""

from __future__ import annotations

import json

import pytest
import torch
from upstream_fixtures import SIZES, shadow_params, upstream_state_dict

from xdlm.importing import (
    ImportOptions,
    convert,
    import_tokenizer,
    kernel_k,
    model_config,
    read_source,
)
from xdlm.models.upstream import UpstreamWeights, backbone_tensors, rename

V = 61


def _gpt2_dir(path, plain_tokens: int):
    """A GPT-2 tokenizer directory with `plain_tokens` ids and no merges (+ 4 specials)."""
    path.mkdir()
    (path / "encoder.json").write_text(json.dumps({f"t{i}": i for i in range(plain_tokens)}))
    (path / "vocab.bpe").write_text("#version: 0.2\n")
    return str(path)


def _ckpt(path, ema: dict | None = None, step=1234):
    gen = torch.Generator().manual_seed(0)
    sd = upstream_state_dict(V, gen)
    data = {"state_dict": sd, "global_step": step}
    if ema is not None:
        data["ema"] = {**ema, "shadow_params": shadow_params(sd, gen)}
    torch.save(data, path)
    return str(path)


def _weights(hints: dict, sizes: dict = SIZES) -> UpstreamWeights:
    sd = upstream_state_dict(V, torch.Generator().manual_seed(0), sizes)
    return UpstreamWeights(rename(backbone_tensors(sd)), None, {}, hints)


def test_model_sizes_come_from_the_shapes_and_options_win_over_hints():
    sizes = {**SIZES, "d": 128, "layers": 3}
    cfg = model_config(_weights({}, sizes), ImportOptions())
    assert (cfg.n_layers, cfg.d_model, cfg.mlp_ratio, cfg.cond_dim) == (3, 128, 4.0, 16)
    assert cfg.n_heads == 2 and cfg.time_input == "none" and not cfg.time_conditioning  # d / 64
    hinted = _weights({"n_heads": 8, "time_conditioning": True}, sizes)
    cfg = model_config(hinted, ImportOptions())
    assert cfg.n_heads == 8 and cfg.time_input == "sigma" and cfg.time_conditioning
    cfg = model_config(hinted, ImportOptions(n_heads=4, time_input="none"))
    assert cfg.n_heads == 4 and cfg.time_input == "none" and not cfg.time_conditioning


def test_the_kernel_is_asked_for_when_the_source_names_none():
    assert kernel_k(_weights({"model_type": "udlm"}), ImportOptions()) == 1.0
    assert kernel_k(_weights({"model_type": "udlm"}), ImportOptions(k=0)) == 0.0
    with pytest.raises(ValueError) as info:
        kernel_k(_weights({"algo": "sedd"}), ImportOptions())
    assert str(info.value) == (
        "the source does not say which kernel it was trained with (its config names the "
        "algorithm 'sedd'); pass --k (0 for MDLM, 1 for UDLM, the paper's 0.1 for XDLM)"
    )
    with pytest.raises(ValueError, match=r"trained with; pass --k \(0 for MDLM"):
        kernel_k(_weights({}), ImportOptions())
    with pytest.raises(ValueError) as info:
        kernel_k(_weights({"k1": 2}), ImportOptions())
    assert str(info.value) == "the source's config has algo.k1=2, not a share in [0, 1]; pass --k"


def test_the_tokenizer_follows_v_and_must_match_it(tmp_path):
    with pytest.raises(ValueError) as info:
        import_tokenizer(V, ImportOptions())
    assert str(info.value) == (
        "no default tokenizer for V = 61; pass --tokenizer and --tokenizer-source"
    )
    small = _gpt2_dir(tmp_path / "small", 3)
    with pytest.raises(ValueError) as info:
        import_tokenizer(V, ImportOptions(tokenizer="gpt2", tokenizer_source=small))
    assert str(info.value) == "tokenizer gpt2 has 7 ids but the model outputs 61"
    with pytest.raises(ValueError, match="gpt2-mdlm needs the 50,257-token GPT-2 vocabulary"):
        import_tokenizer(50_258, ImportOptions(tokenizer_source=small))  # V picks gpt2-mdlm
    with pytest.raises(FileNotFoundError, match="no WordPiece vocab"):  # V picks BERT's
        import_tokenizer(30_522, ImportOptions(tokenizer_source=str(tmp_path / "vocab.txt")))
    tok = import_tokenizer(V, ImportOptions(tokenizer="gpt2", tokenizer_source=_gpt2_dir(
        tmp_path / "fits", V - 4)))  # fmt: skip
    assert tok.vocab_size == V and tok.mask_id == V - 1


def test_seq_len_is_checked_at_its_limit_and_read_from_the_source(tmp_path):
    source = _ckpt(tmp_path / "a.ckpt")
    gpt2 = _gpt2_dir(tmp_path / "tok", V - 4)
    opts = ImportOptions(k=0.0, n_heads=SIZES["heads"], tokenizer="gpt2", tokenizer_source=gpt2)
    with pytest.raises(ValueError) as info:
        convert(source, ImportOptions(**{**vars(opts), "seq_len": 1}))
    assert str(info.value) == (
        "--seq-len must be >= 2 (tokens per row, the run's data.seq_len), got 1; leave it out "
        "for config.json's or 1024"
    )
    assert convert(source, ImportOptions(**{**vars(opts), "seq_len": 2})).config.data.seq_len == 2
    run = convert(source, opts)  # no option, no model_length in the file: 1024
    assert run.config.data.seq_len == 1024 and run.step == 1234 and run.ema_state is None
    assert run.meta["kernel"] == {"vocab_size": V, "mask_id": V - 1, "k": 0.0}
    assert run.meta["data"] == {"path": "", "vocab_size": V, "mask_id": V - 1}
    assert run.meta["imported"] == {"source": source, "file": None, "format": "lightning",
                                    "ema": False}  # fmt: skip
    assert run.config.kernel.use_mask and run.config.kernel.eps == 1e-3
    assert run.config.data.tokenizer == "gpt2" and run.config.data.tokenizer_source == gpt2
    assert run.config.data.tokenizer_vocab_size is None and run.config.data.mode == "wrap"
    uniform = convert(source, ImportOptions(**{**vars(opts), "k": 1.0}))
    assert uniform.meta["kernel"] == {"vocab_size": V, "mask_id": None, "k": 1.0}
    assert not uniform.config.kernel.use_mask


@pytest.mark.parametrize(
    "ema, decay, updates",
    [({"decay": 0.5, "num_updates": 77}, 0.5, 77), ({"decay": 1, "num_updates": 7.0}, 0.9999, 0),
     ({}, 0.9999, 0)],
)  # fmt: skip
def test_the_ema_keeps_its_recorded_decay_and_count_else_the_defaults(tmp_path, ema, decay,
                                                                      updates):  # fmt: skip
    gpt2 = _gpt2_dir(tmp_path / "tok", V - 4)
    opts = ImportOptions(k=0.1, n_heads=SIZES["heads"], tokenizer="gpt2", tokenizer_source=gpt2)
    run = convert(_ckpt(tmp_path / "a.ckpt", ema), opts)
    state = run.ema_state
    assert (state["decay"], state["num_updates"], state["warmup"]) == (decay, updates, True)
    weights = run.model.state_dict()
    assert state["shadow"].keys() == weights.keys()
    assert all(t.dtype == torch.float32 for t in state["shadow"].values())
    assert any(not torch.equal(state["shadow"][k], weights[k]) for k in weights)  # the average
    assert run.meta["imported"]["ema"] is True


def test_sources_are_files_directories_or_hub_ids(tmp_path, monkeypatch):
    hub = pytest.importorskip("huggingface_hub")
    ckpt = _ckpt(tmp_path / "last.ckpt", step=5)
    assert read_source(str(tmp_path), file="last.ckpt").step == 5  # a directory and its file
    with pytest.raises(FileNotFoundError) as info:
        read_source(str(tmp_path / "a" / "b"))  # two slashes: no Hub id
    assert str(info.value) == (
        f"{tmp_path / 'a' / 'b'} is neither a file, a directory nor a Hub id owner/name"
    )
    calls = []

    def download(repo, file, revision):
        calls.append((repo, file, revision))
        return ckpt

    monkeypatch.setattr(hub, "hf_hub_download", download)
    assert read_source("org/x.y-z", file="last.ckpt", revision="v1").step == 5
    assert calls == [("org/x.y-z", "last.ckpt", "v1")]

    def snapshot(repo, revision, allow_patterns):
        calls.append((repo, revision, allow_patterns))
        raise OSError("offline")

    monkeypatch.setattr(hub, "snapshot_download", snapshot)
    with pytest.raises(ValueError) as info:
        read_source("org/name", revision="v2")
    assert calls[-1] == ("org/name", "v2", ["config.json", "model.safetensors",
                                            "pytorch_model.bin"])  # fmt: skip
    assert str(info.value) == (
        "could not download org/name from the HF Hub (offline); download it elsewhere and pass "
        "the local file or directory"
    )
    monkeypatch.setattr(hub, "hf_hub_download", lambda *a, **k: snapshot("", "", ""))
    with pytest.raises(ValueError, match=r"^could not download org/name last\.ckpt from the HF"):
        read_source("org/name", file="last.ckpt")


@pytest.mark.parametrize(
    "edit, message",
    [({"backbone.blocks.0.norm1.weight": None}, 'Missing key(s) in state_dict: '
      '"blocks.0.norm1.weight".); the checkpoint is incomplete or of another architecture'),
     ({"backbone.blocks.1.norm1.weight": torch.zeros(7)}, "size mismatch for blocks.1.norm1"),
     ({"backbone.vocab_embed.embedding": None}, "the source has no embed.weight tensor (it has 29 "
      "backbone tensors); the checkpoint is incomplete or not an MDLM-lineage DiT"),
     ({"backbone.sigma_map.mlp.0.weight": None}, "the source has no time_in.weight tensor")],
)  # fmt: skip
def test_weights_that_do_not_fit_are_one_line(tmp_path, capsys, edit, message):
    """Regression: a checkpoint missing a tensor (or with one of another shape) crashed
    `xdlm import` with a KeyError / RuntimeError traceback."""
    from xdlm.cli import main

    sd = upstream_state_dict(V, torch.Generator().manual_seed(0))
    sd.update({name: value for name, value in edit.items() if value is not None})
    for name in [name for name, value in edit.items() if value is None]:
        del sd[name]
    torch.save({"state_dict": sd}, tmp_path / "m.ckpt")
    gpt2 = _gpt2_dir(tmp_path / "tok", V - 4)
    argv = [
        "import",
        str(tmp_path / "m.ckpt"),
        "--out",
        str(tmp_path / "run"),
        "--k",
        "0",
        "--n-heads",
        str(SIZES["heads"]),
        "--tokenizer",
        "gpt2",
        "--tokenizer-source",
        gpt2,
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and not (tmp_path / "run").exists()


def test_convert_passes_the_file_and_revision_on(tmp_path, monkeypatch):
    hub = pytest.importorskip("huggingface_hub")
    ckpt = _ckpt(tmp_path / "a.ckpt", step=9)
    gpt2 = _gpt2_dir(tmp_path / "tok", V - 4)
    opts = ImportOptions(k=0.0, n_heads=SIZES["heads"], tokenizer="gpt2", tokenizer_source=gpt2,
                         file="a.ckpt")  # fmt: skip
    run = convert(str(tmp_path), opts)  # a directory and the file in it
    assert run.step == 9 and run.meta["imported"]["file"] == "a.ckpt"
    asked = []
    monkeypatch.setattr(hub, "hf_hub_download", lambda *a, **k: asked.append((a, k)) or ckpt)
    assert convert("org/name", ImportOptions(**{**vars(opts), "revision": "v3"})).step == 9
    assert asked == [(("org/name", "a.ckpt"), {"revision": "v3"})]
