"""Hub-native models: `export_run(RUN, DIR)` writes a self-describing Hugging Face repo.

An exported directory holds only what inference needs, in open formats:

    config.json             {"xdlm_format": 1, "architecture": the model config + vocab_size,
                             "kernel": {vocab_size, mask_id, k, use_mask, schedule},
                             "special_token_ids": {bos, eos, pad, mask}, "training": {...},
                             "config": the full training config, "weights": "ema" | "model"}
    model.safetensors       the weights (the EMA average by default)
    tokenizer.json          the tokenizer (HF `tokenizers`), with xdlm_tokenizer.json (roles)
    tokenizer_config.json   so `transformers.PreTrainedTokenizerFast` also reads it
    README.md               the model card: the data actually trained on (its path, sources and
                            manifest SHA-256), steps, metrics with error bars, working commands

Every file is written with the mode a new file gets (0666 minus the umask; safetensors itself
writes 0600).

`xdlm.runs.load_export(path)` rebuilds a `LoadedRun` from such a directory, reading JSON and
safetensors only (no pickle, no optimizer state); `xdlm.runs.resolve_model_path` also accepts a
Hub repo id ("org/name", downloaded with `huggingface_hub.snapshot_download`). `xdlm sample` /
`eval` take either through `xdlm.runs.load_run` (reading lives there, writing here: this module
imports `xdlm.runs`, never the other way).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors.torch import save_model

from xdlm.files import read_json, read_jsonl
from xdlm.run_checks import with_digest
from xdlm.runs import CONFIG_FILE, EXPORT_FORMAT, WEIGHTS_FILE, is_export, load_run


def export_run(run: str | Path, out_dir: str | Path, use_ema: bool = True,
               overwrite: bool = False, trust_remote_code: bool = False,
               hub_id: str | None = None) -> Path:  # fmt: skip
    """Write RUN's latest checkpoint (or a checkpoint dir) as a Hub repo in `out_dir`
    (`trust_remote_code`: the user's --trust-remote-code, as in `xdlm.runs.load_run`); the
    card's commands name `out_dir` and `hub_id` (the repo it will be pushed to), if given."""
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise FileExistsError(f"{out_dir} is not empty; pass overwrite=True (--overwrite)")
    loaded = load_run(run, use_ema=use_ema, trust_remote_code=trust_remote_code)
    if loaded.tokenizer is None:
        raise ValueError(
            f"{run} has no tokenizer/ directory; export needs a text model's tokenizer"
        )
    has_ema = (loaded.checkpoint / "ema.safetensors").is_file()
    weights = "ema" if use_ema and has_ema else "model"
    out_dir.mkdir(parents=True, exist_ok=True)
    save_model(loaded.model, str(out_dir / WEIGHTS_FILE))
    loaded.tokenizer.save(out_dir)
    _write_tokenizer_config(out_dir, loaded.tokenizer)
    config = _export_config(loaded, weights, _run_dir(loaded.checkpoint))
    (out_dir / CONFIG_FILE).write_text(json.dumps(with_digest(config), indent=2) + "\n")
    card = model_card(config, _run_dir(loaded.checkpoint), str(out_dir), hub_id)
    (out_dir / "README.md").write_text(card)
    for path in out_dir.iterdir():
        _new_file_mode(path)
    return out_dir


def _new_file_mode(path: Path) -> None:
    """chmod `path` to what `open()` creates: 0666 minus the process umask."""
    umask = os.umask(0)
    os.umask(umask)
    path.chmod(0o666 & ~umask)


def _run_dir(ckpt: Path) -> Path:
    return ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt


def _export_config(loaded, weights: str, run_dir: Path) -> dict:
    from xdlm.builders import output_size

    cfg = loaded.config.to_dict()
    tok = loaded.tokenizer
    return {
        "xdlm_format": EXPORT_FORMAT,
        "model_type": "xdlm",
        "architecture": {**cfg["model"], "vocab_size": output_size(loaded.model)},
        "kernel": {
            **loaded.kernel.spec(),
            "use_mask": loaded.kernel.mask_id is not None,
            "schedule": _schedule_spec(loaded.schedule),
        },
        "special_token_ids": tok.special_ids,
        "training": {
            "steps": loaded.step,
            "data": _trained_data(loaded.checkpoint, cfg["data"]),
            "validation": _last_validation(run_dir),
            "eval": _eval_summary(run_dir),
        },
        "config": cfg,
        "weights": weights,
    }


def _trained_data(ckpt: Path, data_cfg: dict) -> dict:
    """The data the run trained on, as `xdlm train` recorded it in meta.json: the prepared
    directory, the files it was prepared from and its manifest's SHA-256 (not the config's
    `data.sources`, which name what to prepare only when the directory is absent)."""
    meta = json.loads((ckpt / "meta.json").read_text()) if (ckpt / "meta.json").is_file() else {}
    recorded = meta.get("data", {})
    keys = ("path", "sources", "manifest_sha256", "tokenizer_sha256", "seq_len", "mode")
    data = {k: recorded.get(k) for k in keys}
    data["path"] = data["path"] or data_cfg.get("path")
    data["seq_len"] = data["seq_len"] or data_cfg.get("seq_len")
    return data


def _schedule_spec(schedule) -> dict:
    from xdlm.core.schedules import schedule_spec

    return schedule_spec(schedule)


def _last_validation(run_dir: Path) -> dict | None:
    """The last validation record of RUN/metrics.jsonl (training-time, fixed noise)."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return None
    records = read_jsonl(path, "a run's metrics")
    valid = [r for r in records if "valid_nats_per_token" in r]
    return valid[-1] if valid else None


def _eval_summary(run_dir: Path) -> dict | None:
    """Likelihood with its standard error and 95 % CI from RUN/eval.json (`xdlm eval`)."""
    path = run_dir / "eval.json"
    if not path.is_file():
        return None
    report = read_json(path, "the report of xdlm eval")
    likelihood = report.get("likelihood")
    if not likelihood:
        return None
    return {"data": likelihood["data"], "split": likelihood["split"], "step": report.get("step"),
            "continuous": likelihood["continuous"]}  # fmt: skip


def model_card(config: dict, run_dir: Path, export_dir: str, hub_id: str | None = None) -> str:
    """The README.md of an export: what was trained on what, how well, how to sample (from
    `export_dir`, and from `hub_id` when it is pushed there)."""
    import xdlm

    train, kernel, arch = config["training"], config["kernel"], config["architecture"]
    lines = [
        "---", "library_name: xdlm", "tags: [discrete-diffusion, xdlm, text-generation]", "---",
        "", f"# {run_dir.name}: XDLM discrete diffusion language model", "",
        f"- kernel: k = {kernel['k']} (share of uniform noise; 0 = MDLM, 1 = UDLM), "
        f"mask id {kernel['mask_id']}, schedule {kernel['schedule']}",
        f"- model: {arch['backbone']} {arch.get('preset', '')}, V = {arch['vocab_size']}, "
        f"weights: {config['weights']}",
        f"- training data: {_data_line(train['data'])}", f"- training steps: {train['steps']}",
        "", "## Metrics", "",
    ]  # fmt: skip
    lines += _metric_lines(train)
    lines += [
        "", "## Use", "",
        f"xdlm is not on PyPI: install it from its source (written by xdlm {xdlm.__version__}),",
        "in a checkout of the xdlm repository:", "", "```bash", "pip install -e .",
    ]  # fmt: skip
    sample = "xdlm sample --steps 32 --num-samples 4 --ckpt"
    lines.append(f"{sample} {export_dir}   # this directory")
    if hub_id:
        lines.append(f"{sample} {hub_id}   # from the Hub (needs huggingface_hub)")
    else:
        lines.append(f"# once uploaded with --push-to-hub ORG/NAME: {sample} ORG/NAME")
    return "\n".join([*lines, "```", ""])


def _data_line(data: dict) -> str:
    """`path` (prepared from SOURCES, L = seq_len, mode; manifest.json SHA-256 ...)."""
    sha = data.get("manifest_sha256")
    parts = [f"prepared from {', '.join(data['sources'])}"] if data.get("sources") else []
    parts += [f"L = {data['seq_len']}"] + ([data["mode"]] if data.get("mode") else [])
    parts.append(f"manifest.json SHA-256 {sha}" if sha else "manifest hash not recorded")
    return f"`{data['path']}` ({'; '.join(parts)})"


def _metric_lines(train: dict) -> list[str]:
    lines = []
    if train["eval"]:
        c, ev = train["eval"]["continuous"], train["eval"]
        lo, hi = c["ci95_nats_per_token"]
        lines.append(
            f"- `xdlm eval` on {ev['data']} ({ev['split']} split, {c['sequences']} rows, "
            f"{c['tokens']} tokens), step {ev['step']}: NELBO "
            f"{c['nats_per_token']:.4f} ± {c['se_nats_per_token']:.4f} nats/token (SE; 95 % CI "
            f"[{lo:.4f}, {hi:.4f}]), PPL ≤ {c['ppl']:.2f} (95 % CI {c['ci95_ppl'][0]:.2f}–"
            f"{c['ci95_ppl'][1]:.2f})"
        )
    if train["validation"]:
        v = train["validation"]
        if "valid_se_nats_per_token" in v:  # the estimator of `xdlm eval`, on the first rows
            lines.append(
                f"- training-time validation at step {v['step']} (the `xdlm eval` estimator on "
                f"the first {v['valid_rows']} rows of the valid split, {v['valid_tokens']} "
                f"tokens): NELBO {v['valid_nats_per_token']:.4f} ± "
                f"{v['valid_se_nats_per_token']:.4f} nats/token (SE)"
            )
        else:  # runs from before validation used the eval estimator
            lines.append(
                f"- training-time validation at step {v['step']}: NELBO "
                f"{v['valid_nats_per_token']:.4f} nats/token on {v['valid_tokens']} tokens "
                "(one fixed noise draw, no error bar: not comparable with `xdlm eval`)"
            )
    return lines or ["- none recorded (run `xdlm eval --ckpt RUN` before exporting)"]


def _write_tokenizer_config(out_dir: Path, tok) -> None:
    roles = {f"{role}_token": token for role, token in tok.special_tokens.items()}
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **roles}
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def push_to_hub(directory: str | Path, repo_id: str, private: bool = False) -> str:
    """Upload an export directory to the Hub repo `repo_id` (created if absent); its URL."""
    from huggingface_hub import HfApi

    if not is_export(directory):
        raise ValueError(f"{directory} is not an `xdlm export` directory")
    api = HfApi()
    api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(folder_path=str(directory), repo_id=repo_id)
    return f"https://huggingface.co/{repo_id}"
