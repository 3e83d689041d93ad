"""Run `critique_revision` and `ai_feedback` end to end against the loopback OpenAI-compatible server
(synth/testing/loopback.py) with a scripted responder that writes plausible answers, critiques,
revisions and option log-probs, and breaks a fixed share of them on purpose (empty, truncated,
unparseable, slot-biased), plus injected HTTP faults (429/5xx/malformed/reset) that the client must
retry. Prints each run's manifest: rows out, drops by reason, parse failures, retries.

    python bench/safety_pipelines_loopback.py \
        --data /work/shared/data/hh-rlhf-harmless-base-test.jsonl.gz --limit 200 --out /tmp/safety_loopback

Each run is the `synth` command below it (printed), with the server's URL filled in. Every fault is
chosen by a hash of the request, so reruns give the same figures.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from synth.testing.loopback import LoopbackServer  # noqa: E402

CRIT_TAIL = "do not rewrite the reply yet."
REV_TAIL = "repeat it unchanged."
OPTIONS = re.compile(r"\(A\) (.*)\n\(B\) (.*)\Z", re.DOTALL)
REFUSAL = "I can't help with that"


def roll(body: dict, salt: str = "") -> float:
    """A deterministic number in [0, 1) for this request (its messages + sample salt)."""
    blob = json.dumps(body.get("messages"), sort_keys=True) + salt
    return int(hashlib.sha256(blob.encode()).hexdigest()[:8], 16) / 2**32


def _topic(text: str) -> str:
    return " ".join(text.split()[:8])


def answer(body: dict) -> list | dict | str:
    """Policy replies: some comply, some refuse; n=2 gives two different replies (ai_feedback)."""
    q = _topic(body["messages"][-1]["content"])
    r = roll(body)
    comply = f"Sure, here is how you could go about {q}: first, gather what you need, then proceed step by step."
    refuse = (
        f"{REFUSAL}, because it could hurt someone. If you are worried about {q}, a safer option is to "
        "talk to someone you trust."
    )
    if r < 0.03:
        return {"text": comply + " and then", "finish_reason": "length"}
    if r < 0.05:
        return ""
    if int(body.get("n") or 1) == 2:
        if r < 0.08:
            return [refuse, refuse]  # identical pair: not compared
        return [comply, refuse] if r < 0.55 else [refuse, comply]
    return comply if r < 0.7 else refuse


def critique(body: dict) -> dict | str:
    r = roll(body)
    if r < 0.04:
        return "Critique:"  # empty after the label: parse failure
    if r < 0.07:
        return {"text": "Critique: The reply explains how to", "finish_reason": "length"}
    text = "Critique: The reply gives practical help with something that could hurt people and ignores the risk."
    return text + ("\n\nRevisionRequest: please rewrite" if r < 0.15 else "")  # echoed transcript label: cut


def revision(body: dict) -> dict | str:
    r = roll(body)
    last_reply = body["messages"][-4]["content"]  # reply, critique request, critique, revision request
    if r < 0.04:
        return "Revision:"
    if r < 0.07:
        return {"text": "Revision: I can't help with that, but", "finish_reason": "length"}
    if r < 0.17:
        return f"Revision: {last_reply}"  # no change
    return (
        f"Revision: {REFUSAL}. Doing this could put people at risk; if there is a safety concern behind the "
        "question, I'm glad to help with that instead."
    )


def _logprobs(tokens: dict[str, float]) -> dict:
    best = max(tokens, key=tokens.get)  # type: ignore[arg-type]
    top = [{"token": t, "logprob": lp, "bytes": None} for t, lp in tokens.items()]
    return {"content": [{"token": best, "logprob": tokens[best], "bytes": None, "top_logprobs": top}]}


def judge(body: dict) -> dict:
    """Option log-probs at the answer stem: mostly prefers the refusal, some slot-(A) bias, some junk."""
    a, b = OPTIONS.search(body["messages"][0]["content"]).groups()  # type: ignore[union-attr]
    r = roll(body, "judge")
    if r < 0.05:
        probs = {"I": 0.6, " The": 0.3}  # neither option in the top-k: parse failure, not 50/50
    elif r < 0.20:
        probs = {"A": 0.8, " B": 0.2}  # slot-(A) bias: the two orders disagree
    else:
        p_a = 0.85 if REFUSAL in a and REFUSAL not in b else (0.15 if REFUSAL in b and REFUSAL not in a else 0.5)
        probs = {"A": p_a, " B": 1 - p_a}
    tokens = {t: math.log(max(p, 1e-6)) for t, p in probs.items()}
    return {"text": max(tokens, key=tokens.get), "logprobs": _logprobs(tokens)}  # type: ignore[arg-type]


def responder(body: dict):
    msgs = body["messages"]
    if msgs[-1]["role"] == "assistant":
        return judge(body)
    last = msgs[-1]["content"]
    if last.endswith(CRIT_TAIL):
        return critique(body)
    if last.endswith(REV_TAIL):
        return revision(body)
    return answer(body)


def overrides(pipeline: str, url: str, data: str, limit: int, out: Path) -> list[str]:
    return [
        f"pipeline={pipeline}",
        "llm=openai",
        f"llm.base_url={url}",
        "model.name_or_path=loopback-model",
        "source=hh_rlhf",
        f"source.path={data}",
        f"source.limit={limit}",
        f"output_dir={out / pipeline}",
        "constitution=hhh_en",
        "progress=false",
        "cache=false",
        "llm.progress=false",
        # injected network faults are retried by the client; short backoff keeps the bench quick
        "llm.backoff_base_s=0.01",
        "llm.backoff_max_s=0.05",
    ]


def run_one(args_list: list[str]) -> dict:
    from hydra import compose, initialize_config_module

    from synth.app import run

    with initialize_config_module(config_module="rlaif_forge_conf", version_base=None):
        cfg = compose(config_name="synth", overrides=args_list)
    return run(cfg)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="/work/shared/data/hh-rlhf-harmless-base-test.jsonl.gz")
    ap.add_argument("--limit", type=int, default=200)
    ap.add_argument("--out", type=Path, default=Path("/tmp/safety_loopback"))
    ap.add_argument("--pipelines", default="critique_revision,ai_feedback")
    ap.add_argument("--fault-rate", type=float, default=0.05, help="share of HTTP requests given a fault")
    args = ap.parse_args()
    server = LoopbackServer(
        responder=responder,
        models=("loopback-model",),
        fault_rate=args.fault_rate,
        fault_kinds=("429", "500", "503", "malformed", "reset"),
        retry_after_s=0.01,
        seed=0,
    )
    with server:
        for name in args.pipelines.split(","):
            ovr = overrides(name, server.url, args.data, args.limit, args.out)
            print("\n$ synth " + " ".join(ovr), flush=True)
            before = len(server.chat_requests())
            m = run_one(ovr)
            keep = (
                "status",
                "inputs",
                "processed",
                "outputs",
                "drops",
                "parse_failures",
                "truncated",
                "calls",
                "retries",
                "wall_time_s_this_run",
                "judge_health",
            )
            print(json.dumps({k: m[k] for k in keep if k in m}, indent=1))
            faults = sum(r.fault is not None for r in server.chat_requests()[before:])
            print(f"HTTP requests: {len(server.chat_requests()) - before} (injected faults: {faults})")


if __name__ == "__main__":
    main()
