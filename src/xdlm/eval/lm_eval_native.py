"""Our own runs as lm-eval models: `pretrained=RUN_DIR`, a checkpoint dir or an `xdlm export` dir.

    xdlm lm-eval --model xdlm --model_args pretrained=runs/xdlm --tasks lambada_openai
    xdlm lm-eval --model xdlm --model_args pretrained=hub/xdlm-wiki --tasks hellaswag

`XDLMHarnessLM` loads such a directory with `xdlm.runs.load_run` (EMA weights; an export holds
the weights it was exported with) instead of `transformers`: the run's own denoiser (native
DiT or imported MDLM DiT), kernel (V, mask id, k), noise schedule α_t, `train.t_min` and
tokenizer, and the sampler of its `sample` config. The scoring and generation code paths are
the adapter's, shared with HF backbones. Only local directories are recognised; a Hub id goes
to the HF path (download an export first: `huggingface-cli download ORG/NAME --local-dir DIR`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from xdlm.builders import SamplingPlan, build_sampler, resolve_sampling
from xdlm.core.kernel import MixedKernel
from xdlm.core.schedules import Schedule


def is_native(pretrained: str | None) -> bool:
    """True when `pretrained` is a local xdlm run, checkpoint or export directory."""
    if pretrained is None:
        return False
    path = Path(pretrained)
    if not path.is_dir():
        return False
    from xdlm.runs import is_export

    return is_export(path) or (path / "meta.json").is_file() or (path / "checkpoints").is_dir()


class RunTokenizer:
    """A run's `TextTokenizer` with the Hugging Face calls the harness makes: `tok(text)`,
    `decode`, the special-token ids and `name_or_path`. Text is tokenized exactly as in
    training (`TextTokenizer.encode`: a literal "[MASK]" in the text is ordinary text)."""

    def __init__(self, tokenizer, name: str) -> None:
        self._tok = tokenizer
        self.name_or_path = name
        self.bos_token_id, self.eos_token_id = tokenizer.bos_id, tokenizer.eos_id
        self.pad_token_id, self.mask_token_id = tokenizer.pad_id, tokenizer.mask_id

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        """{"input_ids": ids of `text`}, BOS first when `add_special_tokens`."""
        ids = self._tok.encode(text)
        return {"input_ids": [self.bos_token_id, *ids] if add_special_tokens else ids}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special=skip_special_tokens)

    def apply_chat_template(self, *args, **kwargs) -> str:
        raise ValueError(
            f"{self.name_or_path} is an xdlm run with no chat template; drop --apply_chat_template"
        )


@dataclass(frozen=True)
class NativeModel:
    """What the harness needs from a run: denoiser, tokenizer, kernel, α_t, t_min, the trained
    sequence length L (the default `max_length`) and the run's sampling plan."""

    denoiser: object
    tokenizer: RunTokenizer
    kernel: MixedKernel
    schedule: Schedule
    t_min: float
    seq_len: int
    plan: SamplingPlan


def load_native(
    pretrained: str,
    device: str,
    chosen: dict[str, str | None],
    given: dict[str, object],
    trust_remote_code: bool = False,
) -> NativeModel:
    """Load the run at `pretrained` on `device`. `chosen` sample settings (`sampler`,
    `xdm_rank_dtype`; None: the run's own) replace the run's; `given` holds the model_args the
    user passed that a run defines itself (k, mask_id) or that apply to HF backbones only
    (dtype), each an error unless it agrees with the run; `trust_remote_code` (the command
    line's) goes to `load_run` (a run of an HF backbone with custom code)."""
    from xdlm.runs import load_run

    run = load_run(pretrained, device=device, trust_remote_code=trust_remote_code)
    if run.tokenizer is None:
        raise ValueError(f"{pretrained} has no tokenizer/ directory; lm-eval needs the run's text")
    _check_given(pretrained, run.kernel, given)
    sample = run.config.sample
    sample = dataclasses.replace(sample, **{k: v for k, v in chosen.items() if v is not None})
    plan = build_sampler(resolve_sampling(sample, run.config.model, run.kernel.mask_id))
    return NativeModel(
        run.model, RunTokenizer(run.tokenizer, str(pretrained)), run.kernel, run.schedule,
        run.config.train.t_min, run.config.data.seq_len, plan,
    )  # fmt: skip


def _check_given(pretrained: str, kernel: MixedKernel, given: dict[str, object]) -> None:
    """k and mask_id come from the run (they may restate it); dtype belongs to HF backbones."""
    own = {"k": kernel.k, "mask_id": kernel.mask_id}
    for key, value in given.items():
        if value is None:
            continue
        if key in own and own[key] is not None and float(value) == float(own[key]):
            continue
        if key in own:
            raise ValueError(
                f"{pretrained} was trained with {key}={own[key]}, model_args say {key}={value}; "
                f"drop {key}= (a run's kernel is its own)"
            )
        raise ValueError(
            f"model_arg {key}={value} applies to Hugging Face backbones, not to the xdlm run "
            f"{pretrained}; drop it"
        )
