"""EleutherAI lm-evaluation-harness model interface for xdlm denoisers (registered as "xdlm").

    xdlm lm-eval --model xdlm --device cuda --tasks mbpp --confirm_run_unsafe_code \
        --batch_size 8 \
        --model_args pretrained=GSAI-ML/LLaDA-8B-Base,trust_remote_code=True,k=0.1,dtype=bfloat16
    xdlm lm-eval --model xdlm --model_args pretrained=runs/xdlm --tasks lambada_openai
    torchrun --nproc-per-node 8 -m xdlm lm-eval --model xdlm ...     # data-parallel ranks

`pretrained` is an HF backbone (path or hub name, loaded with transformers) or one of our own
local run / checkpoint / `xdlm export` directories (`xdlm.eval.lm_eval_native`: the run's
denoiser, kernel, schedule, tokenizer and sampler; k and mask_id are the run's own).
`xdlm lm-eval ARGS` is lm-eval's own CLI with this module imported (which registers "xdlm");
lm-eval 0.4.13 discovers no models from other packages, so the plain `lm_eval` command does
not know "xdlm". `device` and `batch_size` go to `--device` / `--batch_size`, not
`--model_args` (`xdlm lm-eval` defaults `--device` to cuda when visible, else cpu; a device
this machine lacks is an error); an unknown model_arg is an error. `batch_size` requests are
scored in one forward pass (their Monte-Carlo noise is drawn per request, as with
batch_size 1). Under torchrun (WORLD_SIZE > 1) each rank gets its share of the requests from
lm-eval and the results are gathered over torch.distributed.

Scores:
- `loglikelihood(context, continuation)` is a Monte-Carlo estimate of −NELBO of the continuation
  with the context kept clean (never noised) and only continuation tokens in the loss:
  −E_t E_{z_t} Σ_{continuation} ℓ_t(x, z_t) with the exact (−α'_t) weight and antithetic t. In
  expectation it is a LOWER BOUND on log p(continuation | context), and it is noisy (raise
  `mc_samples`); comparisons between choices of a multiple-choice task use the same bound.
  `is_greedy`: the one-step argmax with the whole continuation masked equals the continuation.
- `loglikelihood_rolling(text)`: the text split into lm_eval's disjoint rolling windows (each
  token predicted once, with as much clean context as fits in `max_length`); the sum of the
  windows' bounds. lm_eval sizes its windows for an AR model, whose input drops the last token:
  `max_seq_len = max_length − 1` makes context ‖ continuation fit in `max_length` here.
- `generate_until`: `xdlm.sampling.generate` with the "xdm" sampler by default: the authors'
  LLaDA-XDLM algorithm (greedy confidence-ordered unmasking on the full canvas plus argmax edits
  under the cumulative budget ⌊k/(1−k)·Σ n⌋, prompt tokens editable too), `steps` in total
  split over the blocks, one block unless `block_length` is set; cut at the first stop string.
  `sampler=confidence` picks our variant (per-step budget, prompt frozen, see docs/sampling.md).
"""

from __future__ import annotations

import inspect
import os

import torch
import torch.distributed as dist
from lm_eval import utils as lm_utils
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from torch import Tensor

from xdlm.builders import build_device, build_sampler, build_schedule
from xdlm.config import KernelConfig, SampleConfig, TrainConfig
from xdlm.core.kernel import MixedKernel
from xdlm.core.objective import corrupt_batch
from xdlm.eval import lm_eval_code
from xdlm.eval.lm_eval_native import is_native, load_native
from xdlm.sampling import XDM, fixed_from_template, generate

lm_eval_code.install()  # lm-eval's code tasks run model-written programs only in the sandbox


@register_model("xdlm")
class XDLMHarnessLM(LM):
    """lm_eval `LM` over a denoiser and an HF tokenizer, or over one of our runs.

    Args:
        pretrained: a local xdlm run / checkpoint / export directory (`lm_eval_native`), a
            path or hub name for `HFDenoiser.from_pretrained` (+ `AutoTokenizer`), or None
            when `denoiser` and `tokenizer` objects are given.
        k: uniform share of the kernel (default 0.1; a run's own); mask_id: defaults to the
            tokenizer's mask token (a run's own).
        mc_samples: t samples per loglikelihood request; max_length: longest scored sequence
            (default 4096; a run's training seq_len).
        gen_length, steps: generation length and number of unmasking steps (paper: 256, 32);
            block_length: semi-AR block size (None: one block, as in the paper).
        sampler: "xdm" (the authors' algorithm, default) or "confidence" (our variant); for a
            run, any `sample.sampler` (default: the run's own, with its final step and grid).
        xdm_rank_dtype: "logits" (default: p_θ and its ranking in the model's dtype, ties as
            the authors' `torch.topk` breaks them, so bf16 LLaDA reproduces their choices) or
            "float64" (docs/sampling.md); for a run, default: the run's own.
        device: "auto" (cuda when visible, else cpu) or a device this machine has.
        seed: seeds the generator used for the Monte-Carlo estimates.
        batch_size: requests scored per forward pass (an int; "auto" is not supported);
            max_batch_size caps it.
    """

    def __init__(
        self,
        pretrained: str | None = None,
        denoiser=None,
        tokenizer=None,
        k: float | None = None,
        mask_id: int | None = None,
        mc_samples: int = 16,
        max_length: int | None = None,
        gen_length: int = 256,
        steps: int = 32,
        block_length: int | None = None,
        sampler: str | None = None,
        xdm_rank_dtype: str | None = None,
        device: str = "auto",
        dtype: str | None = None,
        trust_remote_code: bool = False,
        seed: int = 0,
        batch_size: int | str = 1,
        max_batch_size: int | None = None,
        **unknown,
    ) -> None:
        super().__init__()
        if unknown:
            valid = sorted(inspect.signature(XDLMHarnessLM.__init__).parameters)
            valid = [v for v in valid if v not in ("self", "unknown", "denoiser", "tokenizer")]
            raise ValueError(
                f"unknown xdlm model_args {sorted(unknown)}; valid: {', '.join(valid)}"
            )
        self.batch_size = _batch_size(batch_size, max_batch_size)
        self._rank, self._world_size, device = _distributed(build_device(str(device)))
        trust = str(trust_remote_code).lower() == "true"
        if is_native(pretrained):
            given = {"k": k, "mask_id": mask_id, "dtype": dtype}
            chosen = {"sampler": sampler, "xdm_rank_dtype": xdm_rank_dtype}
            native = load_native(pretrained, device, chosen, given, trust_remote_code=trust)
            self._init_native(native, mc_samples, max_length, gen_length, steps, block_length)
            self.device_name, self.seed = device, int(seed)
            return
        if pretrained is not None:
            from transformers import AutoTokenizer

            from xdlm.models.hf import HFDenoiser

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
        k = 0.1 if k is None else float(k)
        self.kernel = MixedKernel(int(denoiser.vocab_size), mask_id, k)
        self.schedule = build_schedule(KernelConfig(k=k))  # the schema's default α_t
        self.t_min = TrainConfig().t_min  # the schema's default
        self.mc_samples = int(mc_samples)
        self.max_length = 4096 if max_length is None else int(max_length)
        self.gen_length, self.steps = int(gen_length), int(steps)
        self.block_length = None if block_length is None else int(block_length)
        sampler = "xdm" if sampler is None else sampler
        if sampler not in ("xdm", "confidence"):
            raise ValueError(
                f"sampler must be 'xdm' or 'confidence' for generation, got {sampler!r}"
            )
        plan = SampleConfig(
            sampler=sampler, final="none", xdm_rank_dtype=xdm_rank_dtype or "logits"
        )
        self.sampler = build_sampler(plan).sampler
        self.generate_kwargs = {"sampler": self.sampler, "final": None}
        self.device_name, self.seed = device, int(seed)

    def _init_native(self, native, mc_samples, max_length, gen_length, steps, block_length):
        """The run's denoiser, tokenizer, kernel, α_t, t_min and sampling plan; `max_length`
        defaults to (and may not exceed) the sequence length the run was trained on."""
        self.denoiser, self.tokenizer = native.denoiser.eval(), native.tokenizer
        self.kernel, self.schedule, self.t_min = native.kernel, native.schedule, native.t_min
        self.mc_samples = int(mc_samples)
        self.max_length = native.seq_len if max_length is None else int(max_length)
        if self.max_length > native.seq_len:
            raise ValueError(
                f"max_length={self.max_length} > the run's training seq_len {native.seq_len}; "
                f"pass max_length<={native.seq_len}"
            )
        self.gen_length, self.steps = int(gen_length), int(steps)
        self.block_length = None if block_length is None else int(block_length)
        self.sampler = native.plan.sampler
        self.generate_kwargs = native.plan.generate_kwargs()

    # ------------------------------------------------------------------ scoring

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _prefix(self) -> list[int]:
        tok = self.tokenizer
        prefix = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        return [prefix] if prefix is not None else []

    def _bounds(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(−NELBO estimate of continuation | clean context, one-step greedy match) per pair,
        `batch_size` pairs per forward pass."""
        results = []
        for start in range(0, len(pairs), self.batch_size):
            results += self._bound_batch(pairs[start : start + self.batch_size])
        return results

    @torch.no_grad()
    def _bound_batch(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        scored = [i for i, (_, y) in enumerate(pairs) if y]
        results = [(0.0, True)] * len(pairs)  # an empty continuation has log p = 0
        if not scored:
            return results
        seqs = []
        for i in scored:
            context, continuation = pairs[i]
            room = max(self.max_length - len(continuation), 0)  # context ‖ continuation fit
            context = context[len(context) - room :] if room < len(context) else context
            seqs.append((context, continuation))
        ids, real = _pad([c + y for c, y in seqs], self.device_name)  # (R, L), (R, L)
        keep = torch.zeros_like(real)
        for r, (context, _) in enumerate(seqs):
            keep[r, : len(context)] = True
        nats = self._mc_nats(ids, real, keep)  # (R,)
        z = torch.where(keep | ~real, ids, torch.full_like(ids, self.kernel.mask_id))
        mask = real if not real.all() else None
        t = torch.ones(len(z), device=z.device)  # the continuation fully noised (t = 1)
        pred = self.kernel.log_probs(self.denoiser(z, t, attention_mask=mask)).argmax(-1)
        for r, i in enumerate(scored):
            target = ~keep[r] & real[r]
            greedy = bool((pred[r][target] == ids[r][target]).all())
            results[i] = (-nats[r].item() / self.mc_samples, greedy)
        return results

    def _mc_nats(self, ids: Tensor, real: Tensor, keep: Tensor) -> Tensor:
        """Σ over each row's continuation of ℓ_t, summed over `mc_samples` draws, (R,).

        Every request draws its t and z_t from its own generator seeded with `seed` (the
        same noise as when scored alone); the R · mc_samples rows share one forward pass."""
        n, lengths = self.mc_samples, real.sum(-1).tolist()
        x0 = ids.repeat_interleave(n, 0)  # (R·n, L)
        noisy = [
            corrupt_batch(
                self.kernel,
                self.schedule,
                ids[r : r + 1, :size].expand(n, -1),
                keep_mask=keep[r : r + 1, :size].expand(n, -1),
                t_min=self.t_min,
                generator=torch.Generator(self.device_name).manual_seed(self.seed),
            )  # fmt: skip
            for r, size in enumerate(lengths)
        ]
        t, alpha, dalpha = (
            torch.cat([getattr(b, f) for b in noisy]) for f in ("t", "alpha", "dalpha")
        )
        z_t = torch.cat([_right_pad(b.z_t, ids.shape[1]) for b in noisy])
        attn = real.repeat_interleave(n, 0)
        logits = self.denoiser(z_t, t, attention_mask=None if attn.all() else attn)
        per_token = self.kernel.nelbo(logits, x0, z_t, alpha, dalpha)  # (R·n, L)
        counted = (~keep & real).repeat_interleave(n, 0)
        per_token = torch.where(counted, per_token, torch.zeros_like(per_token))
        return per_token.sum(-1).view(len(ids), n).sum(-1)

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        """Instances with args (context, continuation) -> [(bound on log p, is_greedy)]."""
        pairs = [
            (self._prefix() + self._encode(context), self._encode(continuation))
            for context, continuation in (req.args for req in requests)
        ]
        return self._bounds(pairs)

    def loglikelihood_rolling(self, requests) -> list[float]:
        """Instances with args (text,) -> [sum of window bounds] (see module docstring)."""
        results = []
        for req in requests:
            (text,) = req.args
            prefix = self._prefix() or [self.tokenizer.pad_token_id or 0]
            windows = lm_utils.get_rolling_token_windows(
                token_list=self._encode(text), prefix_token=prefix[0],
                max_seq_len=self.max_length - 1, context_len=1,
            )  # fmt: skip
            pairs = [(list(c), list(y)) for c, y in map(lm_utils.make_disjoint_window, windows)]
            results.append(sum(score for score, _ in self._bounds(pairs)))
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
            steps=steps, **self.generate_kwargs,
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
            length = min(length, self.max_length - 1)  # prompt ‖ generation fit max_length
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

    # ------------------------------------------------------------------ data parallel

    def all_gather(self, tensor: Tensor) -> Tensor:
        if self._world_size == 1:
            return tensor
        parts = [torch.empty_like(tensor) for _ in range(self._world_size)]
        dist.all_gather(parts, tensor)
        return torch.stack(parts) if tensor.dim() == 0 else torch.cat(parts)

    def gather_object(self, obj, dst: int = 0):
        if self._world_size == 1:
            return [obj]
        out = [None] * self._world_size if self._rank == dst else None
        dist.gather_object(obj, out, dst=dst)
        return out

    def barrier(self) -> None:
        if self._world_size > 1:
            dist.barrier()


def _batch_size(batch_size: int | str, max_batch_size: int | None) -> int:
    """lm-eval's --batch_size (an int or its string) capped by --max_batch_size."""
    try:
        size = int(batch_size)
    except ValueError:
        raise ValueError(
            f"batch_size={batch_size!r} is not supported by xdlm; pass an integer"
        ) from None
    if size < 1:
        raise ValueError(f"batch_size must be >= 1, got {size}")
    return min(size, int(max_batch_size)) if max_batch_size is not None else size


def _distributed(device: str) -> tuple[int, int, str]:
    """(rank, world size, device) of this process: torchrun's WORLD_SIZE > 1 starts (or joins)
    a process group, nccl on CUDA (device cuda:LOCAL_RANK), gloo otherwise."""
    initialized = dist.is_available() and dist.is_initialized()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 and not initialized:
        return 0, 1, device
    cuda = str(device).startswith("cuda")
    if cuda and str(device) == "cuda":
        device = f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    if not initialized:
        dist.init_process_group("nccl" if cuda else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def _right_pad(z: Tensor, length: int) -> Tensor:
    """(n, l) -> (n, length) with 0 as filler (attention-masked, never scored)."""
    return torch.nn.functional.pad(z, (0, length - z.shape[1]))


def _pad(seqs: list[list[int]], device: str) -> tuple[Tensor, Tensor]:
    """Right-pad id lists: (ids (R, L) with 0 as filler, real (R, L) bool)."""
    length = max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), length, dtype=torch.long, device=device)
    real = torch.zeros(len(seqs), length, dtype=torch.bool, device=device)
    for r, seq in enumerate(seqs):
        ids[r, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        real[r, : len(seq)] = True
    return ids, real
