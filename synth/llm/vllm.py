"""`llm=vllm`: the offline `vllm.LLM` engine.

A `generate` call hands the WHOLE batch to `llm.chat(...)` in one call, so vLLM schedules it
continuously. With several chunks in flight (the default for vllm), the runner merges the calls the chunks
make at the same time into one `generate` here (synth/llm/merge.py), so one engine call carries a stage of
every chunk in flight. `LLM.chat` takes a list of conversations with one `vllm.SamplingParams` per
conversation (`n`, temperature, top_p, top_k, max_tokens, seed, stop, logprobs=k, structured output for
JSON schemas).
The chat-template flags are per call, so assistant-prefill requests (`add_generation_prompt=False,
continue_final_message=True`) go in a second `chat` call: at most two calls per stage, one per kind.
Seeded requests with n > 1 are sent as n conversations with n=1 and seed `sample_seed(seed, i)`
(base.py's contract, which the call cache relies on); prefix caching keeps the shared prompt cheap.

Structured output follows the current API (`SamplingParams(structured_outputs=StructuredOutputsParams(
json=schema))`, vLLM >= 0.10.2; the old `guided_decoding=GuidedDecodingParams(...)` was removed in
0.12) and falls back to the old one, then to none (the step's parser still validates the answer).

Model names resolve as in `llm=hf` (synth/modelfiles.py): a hub id or folder is passed as it is; a GGUF
(`<folder>/<f>.gguf`, `pkg:<module>/<f>.gguf`, a folder holding one `.gguf`, or `model.gguf_file`)
becomes `LLM(model=<the .gguf file>, tokenizer=...)`, since vLLM loads a single GGUF file, not a folder
(vLLM docs, "GGUF"; a GGUF in a hub repo is downloaded first with `huggingface_hub.hf_hub_download`).
The tokenizer is `llm.tokenizer` when set (vLLM recommends the base model's HF tokenizer: converting a
GGUF's own tokenizer is slow for large vocabularies), else the HF tokenizer files beside the GGUF, else
the GGUF file itself. GGUF support in vLLM is experimental; recent releases ship it in the separate
`vllm-gguf-plugin` package.

`data_parallel_size > 1`: vLLM's offline `LLM` refuses single-process data parallelism, so we start
one worker process per replica (each sees its own `tensor_parallel_size * pipeline_parallel_size`
GPUs through CUDA_VISIBLE_DEVICES), split the batch across them and make one `chat` call per kind in
each. `vllm` is imported only here and inside the workers.
"""

from __future__ import annotations

import logging
import os
import traceback
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from synth.llm.base import (
    BackendError,
    CallStats,
    Completion,
    ConfigError,
    ModelSettings,
    Request,
    SamplingParams,
    TokenLogprob,
    adapter_fingerprint,
    as_params_list,
    is_prefill,
    split_seeded,
)
from synth.modelfiles import require_gguf, resolve_model

log = logging.getLogger(__name__)

# one unit of work: (messages as dicts, params with the right n / seed, prefill?)
Job = tuple[list[dict[str, str]], SamplingParams, bool]


class VLLMSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    kind: Literal["vllm"] = "vllm"
    tensor_parallel_size: int = Field(1, ge=1)
    pipeline_parallel_size: int = Field(1, ge=1)
    data_parallel_size: int = Field(1, ge=1)
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1)
    max_model_len: int | None = Field(None, ge=1)
    dtype: str = "auto"
    seed: int = 0
    enforce_eager: bool = False
    enable_lora: bool = False  # turned on by itself when `adapter` is set
    adapter: str | None = None  # a LoRA adapter folder, applied to every request
    max_lora_rank: int = Field(64, ge=1)
    max_logprobs: int = Field(20, ge=0)
    enable_prefix_caching: bool = True
    use_tqdm: bool = True
    tokenizer: str | None = None  # HF tokenizer (hub id or folder); default: the model's own (see the docstring)
    engine_kwargs: dict[str, Any] = Field(default_factory=dict)  # any other vllm.LLM / EngineArgs keyword


_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


def model_files(settings: VLLMSettings, model: ModelSettings) -> tuple[str, str, str | None]:
    """(model, tokenizer, revision) for `vllm.LLM`: a folder / hub id as it is, a GGUF as its file path
    (downloaded from the hub when it is not local; the revision then went into the download)."""

    source = resolve_model(model.name_or_path, model.gguf_file)
    if not source.gguf_file:
        return source.path, settings.tokenizer or source.path, model.revision
    require_gguf(source)  # vLLM reads GGUF metadata with the same `gguf` package
    folder = Path(source.path)
    if folder.is_dir():
        file = folder / source.gguf_file
        if not file.is_file():
            raise ConfigError(f"model.gguf_file={source.gguf_file}: no such file in {folder}")
        own = any((folder / name).is_file() for name in _TOKENIZER_FILES)
        return str(file), settings.tokenizer or str(folder if own else file), None
    from huggingface_hub import hf_hub_download

    local = hf_hub_download(source.path, source.gguf_file, revision=model.revision)
    return local, settings.tokenizer or local, None


def engine_kwargs(settings: VLLMSettings, model: ModelSettings) -> dict[str, Any]:
    """Keyword arguments for `vllm.LLM(...)` (engine_kwargs last: they win)."""
    lora = settings.enable_lora or settings.adapter is not None
    path, tokenizer, revision = model_files(settings, model)
    kw: dict[str, Any] = {
        "model": path,
        "tokenizer": tokenizer,
        "revision": revision,
        "tokenizer_revision": revision if tokenizer == path else None,
        "tensor_parallel_size": settings.tensor_parallel_size,
        "pipeline_parallel_size": settings.pipeline_parallel_size,
        "gpu_memory_utilization": settings.gpu_memory_utilization,
        "max_model_len": settings.max_model_len,
        "dtype": settings.dtype,
        "seed": settings.seed,
        "enforce_eager": settings.enforce_eager,
        "max_logprobs": settings.max_logprobs,
        "enable_prefix_caching": settings.enable_prefix_caching,
        "enable_lora": lora,
    }
    if lora:
        kw["max_lora_rank"] = settings.max_lora_rank
    kw = {k: v for k, v in kw.items() if v is not None}
    return {**kw, **settings.engine_kwargs}


class VLLMBackend:
    kind = "vllm"

    def __init__(self, settings: VLLMSettings, model: ModelSettings) -> None:
        self.settings, self.model = settings, model.name_or_path
        self.stats = CallStats()
        self.identity = {
            "kind": self.kind,
            "model": model.name_or_path,
            "revision": model.revision,
            "adapter": adapter_fingerprint(settings.adapter),
            "chat_template": model.chat_template,
        }
        if model.gguf_file:
            self.identity["gguf_file"] = model.gguf_file
        if settings.tokenizer:
            self.identity["tokenizer"] = settings.tokenizer
        spec = (engine_kwargs(settings, model), settings.adapter, model.chat_template, settings.use_tqdm)
        if settings.data_parallel_size == 1:
            self._engines: list[Any] = [_Engine(*spec)]
        else:
            self._engines = _start_workers(spec, settings)
        # stops the replica processes when the backend is collected or the interpreter exits
        self._finalizer = weakref.finalize(self, _close_all, self._engines)

    def __repr__(self) -> str:
        s = self.settings
        return f"VLLMBackend(model={self.model!r}, tp={s.tensor_parallel_size}, dp={s.data_parallel_size})"

    def generate(
        self, requests: Sequence[Request], params: SamplingParams | Sequence[SamplingParams]
    ) -> list[list[Completion]]:
        plist = as_params_list(params, len(requests))
        owners, jobs = [], []
        for r, (req, p) in enumerate(zip(requests, plist, strict=True)):
            conv = [{"role": m.role, "content": m.content} for m in req]
            for unit in split_seeded(p):
                owners.append(r)
                jobs.append((conv, unit, is_prefill(req)))
        results = self._run(jobs)
        out: list[list[Completion]] = [[] for _ in requests]
        for r, comps in zip(owners, results, strict=True):
            out[r].extend(comps)
        self.stats.calls += 1
        self.stats.requests += len(requests)
        self.stats.add_completions(out)
        return out

    def _run(self, jobs: list[Job]) -> list[list[Completion]]:
        """Split the jobs across the replicas (interleaved), run them all, put the results back in order."""
        k = len(self._engines)
        if k == 0:
            raise RuntimeError("this VLLMBackend is closed")
        if k == 1:
            return self._engines[0].run(jobs)
        for w, engine in enumerate(self._engines):
            engine.submit(jobs[w::k])
        results: list[list[Completion]] = [None] * len(jobs)  # type: ignore[list-item]
        for w, engine in enumerate(self._engines):
            results[w::k] = engine.collect()
        return results

    def close(self) -> None:
        self._finalizer()


def _close_all(engines: list[Any]) -> None:
    for engine in engines:
        engine.close()
    engines.clear()


class _Engine:
    """One `vllm.LLM` in this process."""

    def __init__(self, kwargs: dict[str, Any], adapter: str | None, chat_template: str | None, use_tqdm: bool) -> None:
        import vllm

        self.vllm, self.chat_template, self.use_tqdm = vllm, chat_template, use_tqdm
        self.llm = vllm.LLM(**kwargs)
        self.lora = None
        if adapter is not None:
            from vllm.lora.request import LoRARequest

            self.lora = LoRARequest("adapter", 1, adapter)  # one fixed adapter: one id

    def run(self, jobs: list[Job]) -> list[list[Completion]]:
        """At most two `chat` calls: all plain requests, then all prefill requests."""
        results: list[list[Completion]] = [None] * len(jobs)  # type: ignore[list-item]
        for prefill in (False, True):
            idx = [i for i, job in enumerate(jobs) if job[2] == prefill]
            if not idx:
                continue
            outputs = self.llm.chat(
                [jobs[i][0] for i in idx],
                sampling_params=[self._params(jobs[i][1]) for i in idx],
                use_tqdm=self.use_tqdm,
                lora_request=self.lora,
                chat_template=self.chat_template,
                add_generation_prompt=not prefill,
                continue_final_message=prefill,
            )
            for i, ro in zip(idx, outputs, strict=True):
                results[i] = to_completions(ro, jobs[i][1])
        return results

    def _params(self, p: SamplingParams) -> Any:
        kw: dict[str, Any] = {
            "n": p.n,
            "temperature": p.temperature,
            "top_p": p.top_p,
            "max_tokens": p.max_new_tokens,
            "seed": p.seed,
        }
        if p.top_k is not None:
            kw["top_k"] = p.top_k
        if p.stop:
            kw["stop"] = list(p.stop)
        if p.logprobs or p.top_logprobs:
            kw["logprobs"] = p.top_logprobs  # vLLM always adds the sampled token's own log-prob
        if p.json_schema is not None or p.regex is not None:
            kw.update(structured_output_kwargs(p.json_schema, regex=p.regex))
        return self.vllm.SamplingParams(**kw)

    def close(self) -> None:
        self.llm = None


_warned_no_structured = False


def structured_output_kwargs(schema: dict[str, Any] | None, regex: str | None = None) -> dict[str, Any]:
    """`structured_outputs=StructuredOutputsParams(json=... | regex=...)` (current), else the pre-0.12
    `guided_decoding=GuidedDecodingParams(json=... | regex=...)`, else nothing (with one warning)."""
    global _warned_no_structured
    what = {"json": schema} if schema is not None else {"regex": regex}
    try:
        from vllm.sampling_params import StructuredOutputsParams

        return {"structured_outputs": StructuredOutputsParams(**what)}
    except ImportError:
        pass
    try:
        from vllm.sampling_params import GuidedDecodingParams

        return {"guided_decoding": GuidedDecodingParams(**what)}
    except ImportError:
        if not _warned_no_structured:
            log.warning("this vLLM has no structured output API; JSON schemas are not enforced")
            _warned_no_structured = True
        return {}


def to_completions(ro: Any, p: SamplingParams) -> list[Completion]:
    """A vllm RequestOutput -> our Completions, in sample order."""
    prompt_tokens = len(ro.prompt_token_ids or [])
    out = []
    for o in sorted(ro.outputs, key=lambda o: o.index):
        token_ids = list(o.token_ids or [])
        out.append(
            Completion(
                text=o.text,
                finish_reason=o.finish_reason,
                prompt_tokens=prompt_tokens,
                completion_tokens=len(token_ids),
                logprobs=_logprobs(token_ids, o.logprobs, p.top_logprobs) if (p.logprobs or p.top_logprobs) else None,
            )
        )
    return out


def _logprobs(token_ids: list[int], steps: Any, k: int) -> list[TokenLogprob] | None:
    """Per position a dict token_id -> Logprob(logprob, rank, decoded_token); `top` keeps ranks <= k."""
    if steps is None:
        return None
    out = []
    for tid, step in zip(token_ids, steps, strict=True):
        chosen = step[tid]
        top: dict[str, float] = {}
        for lp in sorted(step.values(), key=lambda lp: -lp.logprob):
            if lp.rank is not None and lp.rank <= k:
                top.setdefault(lp.decoded_token or "", lp.logprob)
        out.append(TokenLogprob(token=chosen.decoded_token or "", logprob=chosen.logprob, top=top))
    return out


# ---- data parallelism: one worker process per replica --------------------------------------------------


class _Worker:
    """The parent's handle on one replica process."""

    def __init__(self, ctx: Any, spec: tuple, gpus: list[str], rank: int) -> None:
        self.rank = rank
        self.conn, child = ctx.Pipe()
        # not daemonic: vLLM starts its own engine-core process, which a daemonic process may not do;
        # VLLMBackend's finalizer stops the workers instead
        self.proc = ctx.Process(target=_worker_main, args=(child, spec, gpus), daemon=False, name=f"vllm-dp{rank}")
        self.proc.start()
        child.close()

    def wait_ready(self) -> None:
        self._reply()

    def submit(self, jobs: list[Job]) -> None:
        self.conn.send(jobs)

    def collect(self) -> list[list[Completion]]:
        return self._reply()

    def _reply(self) -> Any:
        try:
            status, payload = self.conn.recv()
        except EOFError:
            raise BackendError(f"vllm data-parallel worker {self.rank} died (exit code {self.proc.exitcode})") from None
        if status != "ok":
            raise BackendError(f"vllm data-parallel worker {self.rank} failed:\n{payload}")
        return payload

    def close(self) -> None:
        try:
            self.conn.send(None)
        except (BrokenPipeError, OSError):
            pass
        self.proc.join(30)
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(5)


def _start_workers(spec: tuple, settings: VLLMSettings) -> list[_Worker]:
    import multiprocessing as mp

    per = settings.tensor_parallel_size * settings.pipeline_parallel_size
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    devices = visible.split(",") if visible else [str(i) for i in range(per * settings.data_parallel_size)]
    if len(devices) < per * settings.data_parallel_size:
        raise ValueError(
            f"llm.data_parallel_size={settings.data_parallel_size} x {per} GPUs each needs "
            f"{per * settings.data_parallel_size} GPUs; CUDA_VISIBLE_DEVICES has {len(devices)}"
        )
    ctx = mp.get_context("spawn")  # CUDA must not be initialised in a forked child
    workers = [_Worker(ctx, spec, devices[w * per : (w + 1) * per], w) for w in range(settings.data_parallel_size)]
    try:
        for w in workers:  # the replicas load in parallel; wait for all
            w.wait_ready()
    except BaseException:
        for w in workers:
            w.close()
        raise
    return workers


def _worker_main(conn: Any, spec: tuple, gpus: list[str]) -> None:
    os.environ["CUDA_VISIBLE_DEVICES"] = ",".join(gpus)
    try:
        engine = _Engine(*spec)
        conn.send(("ok", None))
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        return
    while (jobs := conn.recv()) is not None:
        try:
            conn.send(("ok", engine.run(jobs)))
        except BaseException:
            conn.send(("error", traceback.format_exc()))
