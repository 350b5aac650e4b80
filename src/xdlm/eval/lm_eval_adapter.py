"""EleutherAI lm-evaluation-harness model interface for xdlm denoisers (registered as "xdlm").

    python -c "import sys, xdlm.eval.lm_eval_adapter; from lm_eval.__main__ import cli_evaluate; \
        sys.exit(cli_evaluate())" --model xdlm --device cuda --tasks mbpp \
        --confirm_run_unsafe_code \
        --model_args pretrained=GSAI-ML/LLaDA-8B-Base,trust_remote_code=True,k=0.1,dtype=bfloat16

(Importing this module registers the model; the plain `lm_eval` command does not import it.
`device` goes to `--device`, not `--model_args`.)

Scores:
- `loglikelihood(context, continuation)` is a Monte-Carlo estimate of −NELBO of the continuation
  with the context kept clean (never noised) and only continuation tokens in the loss:
  −E_t E_{z_t} Σ_{continuation} ℓ_t(x, z_t) with the exact (−α'_t) weight and antithetic t. In
  expectation it is a LOWER BOUND on log p(continuation | context), and it is noisy (raise
  `mc_samples`); comparisons between choices of a multiple-choice task use the same bound.
  `is_greedy`: the one-step argmax with the whole continuation masked equals the continuation.
- `loglikelihood_rolling(text)`: the text split into lm_eval's disjoint rolling windows (each
  token predicted once, with as much clean context as fits in `max_length`); the sum of the
  windows' bounds.
- `generate_until`: `xdlm.sampling.generate` with the "xdm" sampler by default: the authors'
  LLaDA-XDLM algorithm (greedy confidence-ordered unmasking on the full canvas plus argmax edits
  under the cumulative budget ⌊k/(1−k)·Σ n⌋, prompt tokens editable too), `steps` in total
  split over the blocks, one block unless `block_length` is set; cut at the first stop string.
  `sampler=confidence` picks our variant (per-step budget, prompt frozen, see docs/sampling.md).
"""

from __future__ import annotations

import torch
from lm_eval import utils as lm_utils
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from torch import Tensor

from xdlm.builders import build_sampler, build_schedule
from xdlm.config import KernelConfig, SampleConfig
from xdlm.core.kernel import MixedKernel
from xdlm.core.objective import diffusion_loss
from xdlm.sampling import XDM, fixed_from_template, generate


@register_model("xdlm")
class XDLMHarnessLM(LM):
    """lm_eval `LM` over a denoiser and an HF tokenizer.

    Args:
        pretrained: path or hub name for `HFDenoiser.from_pretrained` (+ `AutoTokenizer`), or
            None when `denoiser` and `tokenizer` objects are given.
        k: uniform share of the kernel; mask_id: defaults to the tokenizer's mask token.
        mc_samples: t samples per loglikelihood request; max_length: longest scored sequence.
        gen_length, steps: generation length and number of unmasking steps (paper: 256, 32);
            block_length: semi-AR block size (None: one block, as in the paper).
        sampler: "xdm" (the authors' algorithm, default) or "confidence" (our variant).
        seed: seeds the generator used for the Monte-Carlo estimates.
    """

    def __init__(
        self,
        pretrained: str | None = None,
        denoiser=None,
        tokenizer=None,
        k: float = 0.1,
        mask_id: int | None = None,
        mc_samples: int = 16,
        max_length: int = 4096,
        gen_length: int = 256,
        steps: int = 32,
        block_length: int | None = None,
        sampler: str = "xdm",
        device: str = "cpu",
        dtype: str | None = None,
        trust_remote_code: bool = False,
        seed: int = 0,
        **_unused,
    ) -> None:
        super().__init__()
        if pretrained is not None:
            from transformers import AutoTokenizer

            from xdlm.models.hf import HFDenoiser

            trust = str(trust_remote_code).lower() == "true"
            denoiser = HFDenoiser.from_pretrained(
                pretrained, torch_dtype=dtype, trust_remote_code=trust
            )
            tokenizer = AutoTokenizer.from_pretrained(pretrained, trust_remote_code=trust)
        if denoiser is None or tokenizer is None:
            raise ValueError("give pretrained=<path or hub name>, or both denoiser and tokenizer")
        self.denoiser = denoiser.to(device).eval()
        self.tokenizer = tokenizer
        mask_id = tokenizer.mask_token_id if mask_id is None else int(mask_id)
        if mask_id is None:
            raise ValueError("the tokenizer has no mask token; pass mask_id=<id>")
        self.kernel = MixedKernel(int(denoiser.vocab_size), mask_id, float(k))
        self.schedule = build_schedule(KernelConfig(k=float(k)))  # the schema's default α_t
        self.mc_samples, self.max_length = int(mc_samples), int(max_length)
        self.gen_length, self.steps = int(gen_length), int(steps)
        self.block_length = None if block_length is None else int(block_length)
        if sampler not in ("xdm", "confidence"):
            raise ValueError(
                f"sampler must be 'xdm' or 'confidence' for generation, got {sampler!r}"
            )
        self.sampler = build_sampler(SampleConfig(sampler=sampler, final="none")).sampler
        self.device_name, self.seed = device, int(seed)

    # ------------------------------------------------------------------ scoring

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _prefix(self) -> list[int]:
        tok = self.tokenizer
        prefix = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        return [prefix] if prefix is not None else []

    @torch.no_grad()
    def _bound(self, context: list[int], continuation: list[int]) -> tuple[float, bool]:
        """(−NELBO estimate of continuation | clean context, one-step greedy match)."""
        if not continuation:
            return 0.0, True
        context = context[-max(self.max_length - len(continuation), 0) :]
        ids = torch.tensor(context + continuation, device=self.device_name)[None]
        x0 = ids.expand(self.mc_samples, -1)
        keep = torch.zeros_like(x0, dtype=torch.bool)
        keep[:, : len(context)] = True
        gen = torch.Generator(self.device_name).manual_seed(self.seed)
        out = diffusion_loss(
            self.denoiser, self.kernel, self.schedule, x0, generator=gen,
            keep_mask=keep, loss_mask=~keep,
        )  # fmt: skip
        z = ids.clone()
        z[:, len(context) :] = self.kernel.mask_id
        pred = self.kernel.log_probs(self.denoiser(z, None)).argmax(-1)
        greedy = bool((pred[0, len(context) :] == ids[0, len(context) :]).all())
        return -out.nats.item() / self.mc_samples, greedy

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """Instances with args (context, continuation) -> [(bound on log p, is_greedy)]."""
        results = []
        for req in requests:
            context, continuation = req.args
            ctx = self._prefix() + self._encode(context)
            results.append(self._bound(ctx, self._encode(continuation)))
        return results

    def loglikelihood_rolling(self, requests) -> list[float]:
        """Instances with args (text,) -> [sum of window bounds] (see module docstring)."""
        results = []
        for req in requests:
            (text,) = req.args
            prefix = self._prefix() or [self.tokenizer.pad_token_id or 0]
            windows = lm_utils.get_rolling_token_windows(
                token_list=self._encode(text), prefix_token=prefix[0],
                max_seq_len=self.max_length, context_len=1,
            )  # fmt: skip
            pairs = map(lm_utils.make_disjoint_window, windows)
            results.append(sum(self._bound(list(c), list(y))[0] for c, y in pairs))
        return results

    # ------------------------------------------------------------------ generation

    @torch.no_grad()
    def generate_ids(self, prompt: list[int], length: int) -> Tensor:
        """The canvas after generation, (1, P + length): the `length` generated ids follow the
        prompt's P columns (which the xdm sampler may have edited; `confidence` freezes them)."""
        seq_len = len(prompt) + length
        steps = self.steps if isinstance(self.sampler, XDM) else min(self.steps, length)
        out = generate(
            self.denoiser, self.kernel, self.schedule, batch_size=1, seq_len=seq_len,
            steps=steps, sampler=self.sampler, final=None,
            generator=torch.Generator(self.device_name).manual_seed(self.seed),
            fixed=fixed_from_template(prompt, 1, seq_len, self.device_name),
            block_size=self.block_length, device=self.device_name,
        )  # fmt: skip
        return out.tokens

    def generate_until(self, requests) -> list[str]:
        """Instances with args (context, {"until": [...], "max_gen_toks": n}) -> texts."""
        results = []
        for req in requests:
            context, gen_kwargs = req.args
            until = gen_kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            length = int(gen_kwargs.get("max_gen_toks", self.gen_length))
            prompt = self._prefix() + self._encode(context)
            prompt = prompt[-max(self.max_length - length, 1) :]
            ids = self.generate_ids(prompt, length)[0, len(prompt) :]
            text = self.tokenizer.decode(ids.tolist(), skip_special_tokens=True)
            for stop in until:
                text = text.split(stop)[0]
            results.append(text)
        return results

    def apply_chat_template(self, chat_history, add_generation_prompt: bool = True) -> str:
        """The tokenizer's chat template as text (lm_eval's --apply_chat_template)."""
        return self.tokenizer.apply_chat_template(
            chat_history, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    @property
    def tokenizer_name(self) -> str:
        return getattr(self.tokenizer, "name_or_path", "xdlm").replace("/", "__")
