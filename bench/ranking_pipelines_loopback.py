"""Run the ranking / self-improvement pipelines against the loopback OpenAI-compatible server.

    python bench/ranking_pipelines_loopback.py --rows 150

Each pipeline (judge pairwise on the data's pairs, judge pairwise between three served "models", judge
listwise and rubric, self_rewarding, bpo, bpo_rewrite, rlrf) runs through the real `synth` config
(`llm=openai` pointed at the loopback server) on hh-rlhf harmless-base test prompts. A scripted
responder plays every role with plausible answers: candidates of varying quality, a judge that is
mostly right but prefers slot A some of the time (position bias) and sometimes breaks the output
format, a BPO constructor whose answers are sometimes malformed or fail the length filters, and a
feedback model that sometimes writes invalid JSON. Prints rows out, drop reasons, parse failures and
the judge's position-bias rate per pipeline.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from synth.testing.loopback import LoopbackServer  # noqa: E402

DATA = Path("/work/shared/data/hh-rlhf-harmless-base-test.jsonl.gz")
ASPECTS = ["factuality", "logical_correctness", "completeness", "insightfulness", "readability", "harmlessness"]
ANSWERS = [  # quality 0..3
    "I don't know.",
    "Sure, whatever you want. Just do it.",
    "That's a tricky question. Generally it is best to stay safe, respect other people and follow the law.",
    "I understand why you are asking. I can't help with anything that could hurt someone, but here is a safer way to "
    "look at it: talk to the people involved, look for reliable information, and if anyone is in danger contact local "
    "emergency services. Would you like some resources?",
]
OPENERS = ["", "Let me think about this. ", "Good question. ", "Here is my take. ", "Thanks for asking. "]
CLOSERS = ["", " I hope that helps.", " Let me know if you have other questions.", " Take care.", " Stay safe."]
VERBS = [
    "stay safe",
    "help a friend",
    "report a scam",
    "calm down",
    "save money",
    "sleep better",
    "learn to cook",
    "ask for a raise",
    "protect my privacy",
    "talk to my kids",
]
PLACES = [
    "when travelling alone",
    "online",
    "at work",
    "after a breakup",
    "on a budget",
    "in a new city",
    "during exams",
    "with little time",
    "as a beginner",
    "in winter",
]
MODEL_SKILL = {"model-strong": 2.2, "model-mid": 1.4, "model-weak": 0.6, "loopback": 1.5}


def u(*parts) -> float:
    """A deterministic uniform draw in [0, 1) from the parts (the responder is stateless)."""
    return int(hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:8], 16) / 2**32


def quality(text: str) -> int:
    """What the scripted judge 'sees': the quality level of one of our answers, or a length-based
    guess for real hh-rlhf replies (refusals and careful answers rank higher, like a harmlessness judge)."""
    for q, ans in enumerate(ANSWERS):
        if ans[:20] in text:
            return q
    if text.startswith("Improved:"):
        return 3
    careful = any(w in text.lower() for w in ("sorry", "can't", "cannot", "not able", "safe", "illegal", "recommend"))
    return 2 + careful if len(text) > 80 else 1 + careful


# --------------------------------------------------------------------------- responder (one role per template)


def candidates(body: dict) -> list[str]:
    skill, prompt = MODEL_SKILL.get(body.get("model"), 1.5), body["messages"][-1]["content"]
    out = []
    for i in range(int(body.get("n") or 1)):
        q = min(3, max(0, int(skill + 2 * u("cand", prompt, body.get("model"), i) - 0.5)))
        o, c = int(5 * u("open", prompt, i)), int(5 * u("close", prompt, i))
        out.append(OPENERS[o] + ANSWERS[q] + CLOSERS[c])
    return out


def pairwise(text: str, body: dict) -> str | dict:
    a = text.split("[Reply A]\n")[1].split("\n[End of reply A]")[0]
    b = text.split("[Reply B]\n")[1].split("\n[End of reply B]")[0]
    r = u("pair", a, b)
    if r < 0.05:
        return "Both replies have merits; I lean towards the first."  # no verdict: a parse failure
    if r < 0.30:
        verdict = "A"  # position bias: slot A regardless of content
    else:
        qa, qb = quality(a) + u("na", a) * 0.8, quality(b) + u("nb", b) * 0.8
        verdict = "A" if qa > qb + 0.15 else "B" if qb > qa + 0.15 else "C"
    return f"Reply {verdict} addresses the request better.\n[[{verdict}]]"


def listwise(text: str) -> str:
    blocks = re.findall(r"\[(\d+)\]\n(.*?)\n\[End of reply \d+\]", text, re.DOTALL)
    if u("list", text) < 0.05:
        return "They are all fine."
    noisy = sorted(blocks, key=lambda b: -(quality(b[1]) + u("ln", b[1], text) * 1.2 + (0.6 if b[0] == "1" else 0)))
    return "Compared.\nRanking: " + " > ".join(f"[{k}]" for k, _ in noisy)


def rubric(text: str, index: int) -> str:
    reply = text.split("[Reply]\n")[1].split("\n[End of reply]")[0]
    if u("rub", reply, index) < 0.05:
        return "A decent reply overall."
    return f"Assessment.\nRating: [[{min(10, 2 + 2 * quality(reply) + int(3 * u('rn', reply, index)))}]]"


def self_judge(text: str, index: int) -> str:
    reply = text.split("<response>")[1].split("</response>")[0]
    r = u("sr", text, index)
    if r < 0.06:
        return "This response is quite good, I would give it four points."  # no 'Score:' line
    return (
        f"The response meets {quality(reply) + 1} criteria.\nScore: "
        f"{min(5, quality(reply) + 1 + (r > 0.8) - (r < 0.2))}"
    )


def bpo_construct(text: str) -> str:
    instruction = text.split("[Instruction]\n")[1].split("\n\n")[0]
    r = u("bpo", instruction)
    if r < 0.05:
        return "Here is my answer to the question: it depends."  # answers instead of rewriting
    if r < 0.12:
        return f"Detailed Comparison Result: ok.\nOptimized Instruction: {instruction} Please be careful."  # no [END]
    if r < 0.16:
        return "Detailed Comparison Result: ok.\nOptimized Instruction: Help. [END]"  # shrunk
    if r < 0.20:
        return "Detailed Comparison Result: ok.\nOptimized Instruction: " + " ".join([instruction] * 8) + " [END]"
    return (
        "Detailed Comparison Result: The better response engages safely and explains its reasons.\n"
        f'Optimized Instruction: "{instruction} Please answer helpfully and safely, and explain your reasoning." [END]'
    )


def feedback(text: str) -> str:
    reply = text.split("[Response]\n")[1].split("\n[End of response]")[0]
    if u("fb", reply) < 0.05:
        return "{'factuality': good}"  # invalid JSON
    q = quality(reply)
    return json.dumps(
        {
            a: {"critique": f"{a} could be better", "rating": max(1, min(3, 1 + (q + int(2 * u(a, reply))) // 2))}
            for a in ASPECTS
        }
    )


def responder(body: dict):
    msgs = body["messages"]
    text = msgs[0]["content"] if msgs[-1]["role"] == "assistant" else msgs[-1]["content"]
    idx = lambda: [i for i in range(int(body.get("n") or 1))]  # noqa: E731
    if "[Reply A]" in text:
        return pairwise(text, body)
    if "Ranking: [number]" in text:
        return listwise(text)
    if "Rating: [[n]]" in text:
        return [rubric(text, i) for i in idx()]
    if "additive 5-point" in text:
        return [self_judge(text, i) for i in idx()]
    if "<task>" in text:
        return [
            f"<task>How can I {VERBS[int(10 * u('t', text, i))]} {PLACES[int(10 * u('t2', text, i))]}?</task>"
            for i in idx()
        ]
    if "[Better response]" in text:
        return bpo_construct(text)
    if text.startswith("You are an expert prompt engineer. Please help me improve"):
        return text.split("response:\n", 1)[1] + " Please answer helpfully, safely and with reasons."
    if "working on AI safety" in text:
        req = text.split("[Request]\n")[1].split("\n\n")[0]
        return (
            "Detailed Comparison Result: checked.\nOptimized Instruction: How can I stay safe and lawful "
            f"regarding: {req} [END]"
        )
    if "fine-grained feedback" in text:
        return feedback(text)
    if "Write only the improved response." in text:
        return "Improved: " + ANSWERS[3]
    return candidates(body)


# --------------------------------------------------------------------------- runs


def compose(url: str, out: Path, rows: int, pipeline: str, overrides: list[str], extra: dict | None = None):
    from hydra import compose as hcompose
    from hydra import initialize_config_module
    from omegaconf import OmegaConf

    with initialize_config_module(config_module="rlaif_forge_conf", version_base=None):
        cfg = hcompose(
            config_name="synth",
            overrides=[
                f"pipeline={pipeline}",
                "llm=openai",
                f"llm.base_url={url}",
                "model.name_or_path=loopback",
                "source=hh_rlhf",
                f"source.path={DATA}",
                f"source.limit={rows}",
                f"output_dir={out}",
                "progress=false",
                "llm.max_concurrency=64",
                *overrides,
            ],
        )
    OmegaConf.set_struct(cfg, False)
    for key, value in (extra or {}).items():
        OmegaConf.update(cfg, key, value, merge=False)
    return cfg


def runs(url: str, llm_cfg: dict) -> list[tuple[str, str, list[str], dict]]:
    models = [
        {"name": m, "llm": llm_cfg, "model": {"name_or_path": m}} for m in ("model-strong", "model-mid", "model-weak")
    ]
    return [
        ("judge pairwise (hh pairs)", "judge", ["source.turns=all"], {}),
        ("judge pairwise (3 models)", "judge", ["pipeline.rating.bootstrap=200"], {"pipeline.candidates": models}),
        (
            "judge listwise (3 models)",
            "judge",
            ["pipeline.mode=listwise", "pipeline.listwise.samples=2"],
            {"pipeline.candidates": models},
        ),
        ("judge rubric (3 models)", "judge", ["pipeline.mode=rubric"], {"pipeline.candidates": models}),
        (
            "self_rewarding (+new prompts)",
            "self_rewarding",
            ["pipeline.new_prompts.enabled=true", "pipeline.new_prompts.keep_seed_prompts=true"],
            {},
        ),
        ("bpo (hh pairs)", "bpo", ["source.turns=all"], {}),
        ("bpo_rewrite", "bpo_rewrite", [], {}),
        ("bpo_rewrite safety+respond", "bpo_rewrite", ["pipeline.safety=true", "pipeline.respond=true"], {}),
        ("rlrf", "rlrf", [], {}),
    ]


def summary(name: str, m: dict, wall: float) -> str:
    lines = [
        f"## {name}  ({wall:.1f}s, {sum(m['calls'].values())} requests)",
        "  | outputs   " + "  ".join(f"{k}={v}" for k, v in m["outputs"].items()),
        "  | drops     " + ("  ".join(f"{k}={v}" for k, v in m["drops"].items()) or "-"),
        "  | parse_failures " + ("  ".join(f"{k}={v}" for k, v in m["parse_failures"].items()) or "-"),
    ]
    rep = m.get("judge")
    if rep:
        lines.append(f"  | position_bias {json.dumps(rep['position_bias'])}")
        for key in ("swap_consistency", "agreement_with_source"):
            if key in rep:
                lines.append(f"  | {key} {json.dumps(rep[key])}")
        if "bradley_terry" in rep:
            bt = " ".join(
                f"{r['model']}={r['rating']:.0f}[{r['ci_low']:.0f},{r['ci_high']:.0f}]"
                for r in rep["bradley_terry"]["models"]
            )
            lines.append(f"  | bradley_terry {bt}")
            lines.append(
                "  | elo           " + " ".join(f"{r['model']}={r['rating']:.0f}" for r in rep["elo"]["models"])
            )
    for key in ("self_rewarding", "rlrf"):
        if key in m:
            lines.append(f"  | {key} {json.dumps(m[key])}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=150)
    ap.add_argument("--latency-ms", type=float, default=5.0)
    ap.add_argument("--out", type=Path, default=None, help="default: a temporary folder")
    args = ap.parse_args()
    from omegaconf import OmegaConf

    from synth.app import run

    out = args.out or Path(tempfile.mkdtemp(prefix="ranking-bench-"))
    with LoopbackServer(responder=responder, latency_s=args.latency_ms / 1000, models=tuple(MODEL_SKILL)) as server:
        llm_cfg = OmegaConf.to_container(compose(server.url, out, 1, "judge", []).llm)
        print(f"loopback server {server.url}; {args.rows} hh-rlhf harmless-base test rows; outputs in {out}\n")
        for k, (name, pipeline, overrides, extra) in enumerate(runs(server.url, llm_cfg)):
            t0 = time.time()
            cfg = compose(server.url, out / f"{k}_{pipeline}", args.rows, pipeline, overrides, extra)
            manifest = run(cfg)
            print(summary(name, manifest, time.time() - t0) + "\n", flush=True)


if __name__ == "__main__":
    main()
