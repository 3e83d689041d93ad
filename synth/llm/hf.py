"""`llm=hf`: in-process transformers generation (CPU or CUDA), the embedded default.

Every (request, sample) of a call becomes one row; rows are sorted by prompt length and generated in
left-padded micro-batches of `batch_size`, so one call batches ALL its requests, whatever their
sampling params. Sampling is done per row by our own logits processor, which hands HF a one-hot score
row (HF then runs greedy). That buys three things HF's global sampler cannot give:
- per-row temperature / top_p / top_k, so mixed params share micro-batches;
- per-row torch generators seeded with `sample_seed(seed, i)` (base.py): a seeded sample is the same
  alone, in any batch, and for any n, which the call cache relies on;
- log-probs taken from the raw model distribution (log_softmax of the logits in float32, before
  temperature and filtering), as vLLM and OpenAI report them; only the top-k per step is kept, so
  memory does not grow with the vocabulary.
- constrained decoding: a request with `json_schema` or `regex` gets an xgrammar matcher
  (https://github.com/mlc-ai/xgrammar) whose token mask is applied to its row before the choice, so
  only text of that format can come out (judge verdicts); other rows in the batch are untouched.
Sampling is batched across rows (one softmax, one sort for top-p); only each row's uniform draw comes
from its own generator, so per-row randomness costs one scalar draw per step, not a vocabulary sort.
The model is named as in synth/modelfiles.py: hub id, folder, `.gguf` file or `pkg:` file.
Stop strings and per-row max_new_tokens are a per-row stopping criterion; text is cut at the first
stop string (finish_reason "stop"); a row that hits its max_new_tokens without EOS is "length". A prompt
longer than `max_input_tokens` is not generated: it returns empty text with finish_reason
"prompt_too_long" (data, not an exception: one bad prompt must not stop a
long run).
"""

from __future__ import annotations

import functools
import json
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from synth.llm.base import (
    CallStats,
    Completion,
    ModelSettings,
    Request,
    SamplingParams,
    TokenLogprob,
    adapter_fingerprint,
    as_params_list,
    is_prefill,
    sample_seed,
)
from synth.modelfiles import load_model, load_tokenizer, resolve_model

_PROGRESS_MIN_ROWS = 8
_NUCLEUS_CANDIDATES = 1024  # top-p looks for the nucleus among these first (synth/llm/hf.py _top_p)


class HFSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["hf"] = "hf"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    batch_size: int = Field(16, ge=1)
    adapter: str | None = None  # a LoRA adapter folder (peft)
    max_input_tokens: int | None = Field(None, ge=1)


@dataclass
class _Row:
    """One (request, sample) to generate."""

    request: int
    ids: list[int]
    params: SamplingParams
    seed: int | None
    result: Completion | None = field(default=None)


class HFBackend:
    kind = "hf"

    def __init__(self, settings: HFSettings, model: ModelSettings) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        self.settings, self.model = settings, model.name_or_path
        self.stats = CallStats()
        source = resolve_model(model.name_or_path, model.gguf_file)
        path = source.display
        self.device = torch.device(_device(settings.device))
        self.tokenizer = load_tokenizer(source, model.revision)
        if model.chat_template:
            self.tokenizer.chat_template = model.chat_template
        net = load_model(AutoModelForCausalLM, source, model.revision, dtype=_dtype(settings.dtype, self.device))
        if settings.adapter:
            net = _with_adapter(net, settings.adapter)
        self.net = net.to(self.device).eval()
        self.pad_id = (
            self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        )
        self.eos_ids = _eos_ids(self.net, self.tokenizer)
        self._grammar_cache: _Grammars | None = None
        self.identity = {
            "kind": self.kind,
            "model": _model_id(model.name_or_path, path),
            "revision": model.revision,
            "adapter": adapter_fingerprint(settings.adapter),
            "chat_template": model.chat_template,
        }
        if model.gguf_file:
            self.identity["gguf_file"] = model.gguf_file
        # the batched inverse-CDF sampler draws other samples for a seed than the per-row multinomial
        # of earlier versions: cached samples of those must not be served as if this run made them
        self.identity["sampler"] = 2

    def __repr__(self) -> str:
        return f"HFBackend(model={self.model!r}, device={str(self.device)!r}, batch_size={self.settings.batch_size})"

    # ---- the Protocol ----------------------------------------------------------------------------
    def generate(
        self, requests: Sequence[Request], params: SamplingParams | Sequence[SamplingParams]
    ) -> list[list[Completion]]:
        plist = as_params_list(params, len(requests))
        prompts = [self._encode(req) for req in requests]
        rows = [
            _Row(r, prompts[r], p, None if p.seed is None else sample_seed(p.seed, i))
            for r, p in enumerate(plist)
            for i in range(p.n)
        ]
        self._generate_rows(rows)
        out: list[list[Completion]] = [[] for _ in requests]
        for row in rows:
            out[row.request].append(row.result)  # type: ignore[arg-type]
        self.stats.calls += 1
        self.stats.requests += len(requests)
        self.stats.add_completions(out)
        return out

    def _encode(self, request: Request) -> list[int]:
        """Chat template -> token ids. The template adds any BOS itself, so no special tokens here."""
        prefill = is_prefill(request)
        text = self.tokenizer.apply_chat_template(
            [{"role": m.role, "content": m.content} for m in request],
            tokenize=False,
            add_generation_prompt=not prefill,
            continue_final_message=prefill,
        )
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _generate_rows(self, rows: list[_Row]) -> None:
        limit = self.settings.max_input_tokens
        todo = []
        for row in rows:
            if limit is not None and len(row.ids) > limit:
                row.result = Completion(text="", finish_reason="prompt_too_long", prompt_tokens=len(row.ids))
            else:
                todo.append(row)
        todo.sort(key=lambda r: len(r.ids))  # similar lengths together: less padding
        bs = self.settings.batch_size
        batches = [todo[i : i + bs] for i in range(0, len(todo), bs)]
        with _progress(len(todo)) as bar:
            for batch in batches:
                self._generate_batch(batch, bar)
                bar.update(len(batch))

    @property
    def _grammars(self) -> _Grammars:
        if self._grammar_cache is None:
            self._grammar_cache = _Grammars(self.tokenizer, self.net.config.get_text_config().vocab_size, self.eos_ids)
        return self._grammar_cache

    def _generate_batch(self, rows: list[_Row], progress: Any = None) -> None:
        import torch
        from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

        from synth.llm.kv_cache import in_place_cache

        input_ids, attention = self._left_pad([r.ids for r in rows])
        top_k = max((r.params.top_logprobs for r in rows), default=0)
        want_lp = any(r.params.logprobs or r.params.top_logprobs for r in rows)
        matchers = {b: self._grammars.matcher(r.params) for b, r in enumerate(rows) if _constrained(r.params)}
        sampler = _RowSampler(
            [r.params for r in rows],
            [r.seed for r in rows],
            self.device,
            want_lp,
            top_k,
            {b: m for b, m in matchers.items() if m is not None},
            self.eos_ids[0] if self.eos_ids else None,
        )
        stopper = _RowStop(input_ids.shape[1], rows, self.tokenizer, self.device, progress)
        # HF only runs the greedy step over our one-hot scores: no sampling warper of its own (those run only
        # with do_sample), so top_k / top_p / temperature are the rows' own, applied by `sampler`, on every
        # transformers version pyproject allows. top_k=None here is inert: transformers 5 fills an unset
        # top_k from the model's generation_config or 50, 4.x leaves it off, and neither uses it without
        # do_sample. What must not happen is the model's generation_config turning sampling or a
        # repetition penalty on (a hub model such as Qwen2.5-Instruct ships do_sample, temperature, top_p,
        # top_k and repetition_penalty): 4.50+ replaces every value of ours that equals the global default
        # by the model's unless `use_model_defaults=False`; 5.x fills only unset values, and every one
        # that matters is set here.
        config = GenerationConfig(
            do_sample=False,
            num_beams=1,
            max_new_tokens=max(r.params.max_new_tokens for r in rows),
            eos_token_id=self.eos_ids,
            pad_token_id=self.pad_id,
            repetition_penalty=1.0,
            temperature=1.0,
            top_p=1.0,
            top_k=None,
            return_dict_in_generate=True,
        )
        with torch.inference_mode():
            out = self.net.generate(
                input_ids=input_ids,
                attention_mask=attention,
                generation_config=config,
                logits_processor=LogitsProcessorList([sampler]),
                stopping_criteria=StoppingCriteriaList([stopper]),
                **_no_model_defaults(),
                **in_place_cache(self.net, config.max_new_tokens),  # KV written in place, no per-step concatenation
            )
        generated = out.sequences[:, input_ids.shape[1] :].tolist()
        lps = sampler.logprobs()
        for b, row in enumerate(rows):
            row.result = self._finish(row, generated[b], None if lps is None else [step[b] for step in lps])

    def _left_pad(self, seqs: list[list[int]]) -> tuple[Any, Any]:
        import torch

        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, width - len(s) :] = torch.tensor(s, dtype=torch.long)
            mask[i, width - len(s) :] = 1
        return ids.to(self.device), mask.to(self.device)

    def _finish(self, row: _Row, tokens: list[int], steps: list[tuple] | None) -> Completion:
        """Cut at EOS, the first stop string or max_new_tokens; say which; attach log-probs."""
        p = row.params
        tokens = tokens[: p.max_new_tokens]
        eos_at = next((i for i, t in enumerate(tokens) if t in self.eos_ids), None)
        body = tokens if eos_at is None else tokens[:eos_at]
        text = self.tokenizer.decode(body, skip_special_tokens=True)
        cut = _first_stop(text, p.stop)
        if cut is not None:
            text, used, finish = text[:cut], self._tokens_to_stop(body, p.stop), "stop"
        elif eos_at is not None:
            used, finish = eos_at + 1, "stop"  # the EOS token counts, as vLLM counts it
        else:
            used, finish = len(tokens), "length"
        logprobs = (
            self._logprobs(tokens[:used], steps, p) if steps is not None and (p.logprobs or p.top_logprobs) else None
        )
        return Completion(
            text=text, finish_reason=finish, prompt_tokens=len(row.ids), completion_tokens=used, logprobs=logprobs
        )

    def _tokens_to_stop(self, tokens: list[int], stops: Sequence[str]) -> int:
        """The fewest leading tokens whose text already contains a stop string (binary search)."""
        lo, hi = 1, len(tokens)
        while lo < hi:
            mid = (lo + hi) // 2
            if _first_stop(self.tokenizer.decode(tokens[:mid], skip_special_tokens=True), stops) is None:
                lo = mid + 1
            else:
                hi = mid
        return lo

    def _logprobs(self, tokens: list[int], steps: list[tuple], p: SamplingParams) -> list[TokenLogprob]:
        ids = {t for t in tokens} | {i for _, _, top_ids in steps[: len(tokens)] for i in top_ids[: p.top_logprobs]}
        text = dict(zip(ids, self.tokenizer.batch_decode([[i] for i in ids]), strict=True))
        out = []
        for tok, (chosen_lp, top_vals, top_ids) in zip(tokens, steps, strict=True):
            top: dict[str, float] = {}
            for i, v in zip(top_ids[: p.top_logprobs], top_vals[: p.top_logprobs], strict=True):
                top.setdefault(text[i], v)  # two ids may decode alike: keep the likelier
            out.append(TokenLogprob(token=text[tok], logprob=chosen_lp, top=top))
        return out


class _RowSampler:
    """A logits processor that picks every row's next token itself (greedy, or sampled with that row's
    temperature / top_k / top_p and its own generator) and returns one-hot scores. Records the chosen
    token's log-prob and the top-k log-probs per step (of the raw distribution) when asked.

    Sampling is batched over the sampled rows (one softmax / sort for all of them); only the uniform
    draw is per row: u_i ~ U(0, 1] from row i's generator picks the token by inverse CDF,
    token = min{v : cdf_i[v] >= u_i * cdf_i[V-1]}. A row's token depends only on its own logits and its
    own generator, so a seeded sample is the same alone or in any batch.

    Rows with a grammar (`matchers[i]`, xgrammar) have the tokens their grammar forbids masked out
    before greedy or sampled choice, and the chosen token is fed back to the grammar; a finished
    grammar allows only end-of-sequence."""

    def __init__(
        self,
        params: list[SamplingParams],
        seeds: list[int | None],
        device: Any,
        want_lp: bool,
        top_k: int,
        matchers: dict[int, Any] | None = None,
        eos_id: int | None = None,
    ):
        import torch

        self.want_lp, self.top_k = want_lp, top_k
        self.sampled = [i for i, p in enumerate(params) if p.temperature > 0]
        self.generators = [
            torch.Generator(device=device).manual_seed(
                seeds[i] if seeds[i] is not None else random.SystemRandom().randrange(2**63)
            )
            for i in self.sampled
        ]
        sp = [params[i] for i in self.sampled]
        self.rows = torch.tensor(self.sampled, dtype=torch.long, device=device)
        self.temperature = torch.tensor([p.temperature for p in sp], dtype=torch.float32, device=device)[:, None]
        self.row_top_k = [p.top_k or 0 for p in sp]
        self.top_p = torch.tensor([p.top_p for p in sp], dtype=torch.float32, device=device)[:, None]
        self.any_top_p = any(p.top_p < 1.0 for p in sp)
        self.matchers, self.eos_id = matchers or {}, eos_id
        self.bitmask = None
        self.steps: list[tuple[Any, Any, Any]] = []

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        import torch

        logits = scores.float()
        lsm = torch.log_softmax(logits, -1) if self.want_lp else None
        if self.matchers:
            logits = self._mask(logits.clone())
        chosen = logits.argmax(-1)
        if self.sampled:
            chosen[self.rows] = self._sample(logits[self.rows])
        for i, m in self.matchers.items():
            if not m.is_terminated():
                m.accept_token(int(chosen[i]))
        if lsm is not None:
            top = lsm.topk(max(self.top_k, 1), -1)
            self.steps.append((lsm.gather(1, chosen[:, None])[:, 0], top.values, top.indices))
        onehot = torch.full_like(logits, float("-inf"))
        onehot.scatter_(1, chosen[:, None], 0.0)
        return onehot.to(scores.dtype)

    def _mask(self, logits: Any) -> Any:
        import xgrammar as xgr

        if self.bitmask is None:
            self.bitmask = xgr.allocate_token_bitmask(logits.shape[0], logits.shape[1])
        rows = []
        for i, m in self.matchers.items():
            if m.is_terminated():  # the answer is complete: only end-of-sequence
                keep = logits[i, self.eos_id].clone()
                logits[i].fill_(float("-inf"))
                logits[i, self.eos_id] = keep
            else:
                m.fill_next_token_bitmask(self.bitmask, i)
                rows.append(i)
        if rows:
            xgr.apply_token_bitmask_inplace(logits, self.bitmask.to(logits.device), indices=rows)
        return logits

    def _sample(self, logits: Any) -> Any:
        """logits [S, V] of the sampled rows -> their tokens [S]."""
        import torch

        x = logits / self.temperature
        if any(self.row_top_k):
            k = max(self.row_top_k)
            kth_index = torch.tensor([max(kk, 1) - 1 for kk in self.row_top_k], device=x.device)
            vals = x.topk(min(k, x.shape[1]), -1).values
            kth = vals.gather(1, kth_index.clamp(max=vals.shape[1] - 1)[:, None])
            limited = torch.tensor([bool(kk) for kk in self.row_top_k], device=x.device)[:, None]
            x = x.masked_fill(limited & (x < kth), float("-inf"))
        if self.any_top_p:
            x = self._top_p(x)
        cdf = torch.softmax(x, -1).cumsum(-1)
        u = torch.stack([1.0 - torch.rand((), generator=g, device=x.device) for g in self.generators])  # (0, 1]
        picked = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None].contiguous()).squeeze(1)
        return picked.clamp(max=x.shape[1] - 1)

    def _top_p(self, x: Any) -> Any:
        """Keep the smallest prefix (by probability) with mass >= top_p. The nucleus is looked for among
        the 1024 likeliest tokens first (a partial top-k instead of a sort of the whole vocabulary);
        only a row whose nucleus is larger than that takes the full sort. Exact either way."""
        import torch

        limited = self.top_p < 1.0
        probs = torch.softmax(x, -1)
        k = min(_NUCLEUS_CANDIDATES, x.shape[1])
        top_vals, order = x.topk(k, -1)
        top_probs = probs.gather(1, order)
        if bool(((top_probs.sum(-1, keepdim=True) >= self.top_p) | ~limited).all()):
            keep = (top_probs.cumsum(-1) - top_probs <= self.top_p) | ~limited
            kept = torch.full_like(x, float("-inf")).scatter(1, order, top_vals.masked_fill(~keep, float("-inf")))
            return torch.where(limited, kept, x)
        sorted_x, order = x.sort(-1, descending=True)
        sorted_p = probs.gather(1, order)
        drop = (sorted_p.cumsum(-1) - sorted_p > self.top_p) & limited
        return x.scatter(1, order, sorted_x.masked_fill(drop, float("-inf")))

    def logprobs(self) -> list[list[tuple[float, list[float], list[int]]]] | None:
        """Per step, per row: (chosen log-prob, top values, top ids), as Python lists."""
        if not self.want_lp:
            return None
        return [list(zip(c.tolist(), v.tolist(), ix.tolist(), strict=True)) for c, v, ix in self.steps]


class _RowStop:
    """Per-row stopping: the row's own max_new_tokens, or a stop string in its generated text."""

    def __init__(self, prompt_width: int, rows: list[_Row], tokenizer: Any, device: Any, progress: Any = None) -> None:
        import torch

        self.prompt_width, self.tokenizer, self.progress = prompt_width, tokenizer, progress
        self.max_new = max(r.params.max_new_tokens for r in rows)
        self.limits = torch.tensor([r.params.max_new_tokens for r in rows], device=device)
        self.stops = [tuple(r.params.stop) for r in rows]
        # a stop string of L characters lies within the last 2L + 4 tokens (byte-level pieces included)
        self.window = [2 * max(map(len, s)) + 4 if s else 0 for s in self.stops]

    def __call__(self, input_ids: Any, scores: Any, **kwargs: Any) -> Any:
        step = input_ids.shape[1] - self.prompt_width
        if self.progress is not None and step % 8 == 0:  # progress within a micro-batch
            self.progress.set_postfix_str(f"token {step}/{self.max_new}", refresh=False)
        done = step >= self.limits
        for i, stops in enumerate(self.stops):
            if stops and not done[i]:
                tail = input_ids[i, max(self.prompt_width, input_ids.shape[1] - self.window[i]) :].tolist()
                done[i] = _first_stop(self.tokenizer.decode(tail, skip_special_tokens=True), stops) is not None
        return done


@functools.cache
def _no_model_defaults() -> dict[str, Any]:
    """`use_model_defaults=False` where the installed `generate` takes it (transformers 4.50 to 4.x: there a
    passed GenerationConfig's default-valued fields are otherwise replaced by the model's generation_config,
    do_sample and repetition_penalty included); 5.x has no such keyword and fills only unset fields."""
    import inspect

    from transformers.generation.utils import GenerationMixin

    return (
        {"use_model_defaults": False}
        if "use_model_defaults" in inspect.signature(GenerationMixin.generate).parameters
        else {}
    )


def _first_stop(text: str, stops: Sequence[str]) -> int | None:
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def _with_adapter(net: Any, adapter: str) -> Any:
    """The model with the peft adapter at `adapter`, merged into the base weights when that is exact up to
    float rounding (LoRA: W + s·BA; the layer then runs one matmul instead of three): nothing trains this
    model, so the adapter never needs to stay apart. Left unmerged when merging would change the model: a
    quantised base (the merged weights would be re-quantised), a target weight shared with another module
    (tied embeddings: the delta would reach both), or an adapter without weights to merge (prompt tuning)."""
    from peft import PeftModel

    net = PeftModel.from_pretrained(net, adapter)
    return net.merge_and_unload() if _mergeable(net) else net


def _mergeable(net: Any) -> bool:
    from collections import Counter

    from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer

    base = net.get_base_model()
    if not isinstance(net.base_model, BaseTuner) or getattr(base, "is_quantized", False):
        return False
    uses = Counter(p.data_ptr() for _, p in base.named_parameters(remove_duplicate=False))
    for layer in net.modules():
        if isinstance(layer, BaseTunerLayer):
            weight = getattr(layer.get_base_layer(), "weight", None)
            if weight is None or uses[weight.data_ptr()] > 1:
                return False
    return True


def _device(setting: str) -> str:
    import torch

    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if setting == "cuda" and not torch.cuda.is_available():
        raise ValueError("llm.device=cuda but CUDA is not available; use llm.device=cpu or auto")
    return setting


def _dtype(setting: str, device: Any) -> Any:
    """auto: float32 on CPU (bf16 matmuls are slow there), bf16 on GPUs that have it, else fp16."""
    import torch

    if setting != "auto":
        return getattr(torch, setting)
    if device.type != "cuda":
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def _eos_ids(net: Any, tokenizer: Any) -> list[int]:
    ids = net.generation_config.eos_token_id
    ids = [] if ids is None else [ids] if isinstance(ids, int) else list(ids)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


def _model_id(name: str, path: str) -> str:
    """Cache identity: builtin models also name their build (the folder carries the spec hash)."""
    from pathlib import Path

    return f"{name}@{Path(path).name}" if name.startswith("builtin:") else name


def _progress(rows: int) -> Any:
    """Rows done (updated per micro-batch), with the micro-batch's current token in the postfix, so a
    long chunk never sits at 0/N. Hidden for small calls."""
    from tqdm.auto import tqdm

    return tqdm(
        total=rows, desc="hf generate", unit="row", leave=False, disable=rows < _PROGRESS_MIN_ROWS, mininterval=1.0
    )


def _constrained(p: SamplingParams) -> bool:
    return p.json_schema is not None or p.regex is not None


class _Grammars:
    """xgrammar (https://github.com/mlc-ai/xgrammar) for this tokenizer: JSON schemas and regexes
    compiled once per backend, one GrammarMatcher per constrained row. Without xgrammar installed the
    constraints are ignored (one warning) and the steps' text parsers are the fallback, as for any
    backend that cannot constrain."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_ids: list[int]) -> None:
        try:
            import xgrammar as xgr
        except ImportError:
            import logging

            logging.getLogger(__name__).warning(
                "llm=hf: xgrammar is not installed, so JSON-schema/regex requests are not enforced; "
                'pip install -e ".[local]" to enforce them'
            )
            self.xgr = None
            return
        self.xgr = xgr
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=eos_ids)
        self.compiler = xgr.GrammarCompiler(info)
        self.compiled: dict[tuple[str, str], Any] = {}

    def matcher(self, p: SamplingParams) -> Any:
        if self.xgr is None:
            return None
        if p.json_schema is not None:
            key = ("json", json.dumps(p.json_schema))  # key order kept: it is the order the model writes
        else:
            key = ("regex", p.regex or "")
        if key not in self.compiled:
            # JSON without free whitespace: a small model otherwise loops on newlines inside the object
            self.compiled[key] = (
                self.compiler.compile_json_schema(key[1], any_whitespace=False)
                if key[0] == "json"
                else self.compiler.compile_regex(key[1])
            )
        return self.xgr.GrammarMatcher(self.compiled[key])
