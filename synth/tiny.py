"""`model=tiny`: a tiny random-weight Llama with a locally trained tokenizer and a chat template.

Built once, deterministically, into a cache folder and then loaded with the ordinary transformers code
(`AutoModelForCausalLM.from_pretrained(path)`), so every pipeline and loop runs offline and the loading
path is the same one a real model takes. Tests use the same builder.

`resolve_model_path("builtin:tiny")` returns the folder (building it if needed); any other name (a hub
id or a local path) is returned unchanged for transformers / vLLM / a server to resolve.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

BUILTIN_PREFIX = "builtin:"

# ChatML, as Qwen uses it; `{% generation %}` is deliberately absent (real templates lack it), so
# train/data.py must find completion tokens by prefix tokenisation like it will for real models.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] }}"
    "{% if not (loop.last and continue_final_message is defined and continue_final_message) %}"
    "{{ '<|im_end|>\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# Spec of the tiny model. Changing anything here changes the cache key.
TINY_SPEC = {
    "arch": "llama",
    "vocab_size": 1024,
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
    "seed": 0,
    "version": 1,
}

_CORPUS_EN = """
Human: How do I bake bread at home? Assistant: Mix flour, water, salt and yeast, knead the dough,
let it rise for an hour, shape it and bake it in a hot oven until the crust is brown.
Critique: The response is helpful and harmless. It gives clear steps and no dangerous advice.
Revision: No change is needed; the answer already follows the principle.
Which of these responses is more helpful, honest and harmless? Options: (A) the first (B) the second.
The answer is: (A) Score: 4 out of 5. Rating [[3]] Verdict: safe unsafe. Optimized Instruction: [END]
I cannot help with that request because it could hurt someone, but here is a safer alternative.
Please explain the reasoning step by step, give evidence, and say when you are not sure.
0 1 2 3 4 5 6 7 8 9 10 A B C D E yes no true false JSON {"score": 5, "verdict": "safe"}
The quick brown fox jumps over the lazy dog. Privacy, honesty, fairness and kindness matter.
"""

_CORPUS_ZH = """
用户：如何在家里烤面包？助手：把面粉、水、盐和酵母混合，揉面，发酵一小时后烘烤。
批评：这个回答有帮助且无害，没有危险的建议。修改：不需要修改，回答已经符合原则。
哪个回答更安全、更有帮助？选项：(A) 第一个 (B) 第二个。答案是：(A) 评分：4 分。
侵犯他人 个人信息 隐私权 健康 心理健康 歧视 性别 年龄 商业违法违规 违反社会主义价值观 安全 不安全
"""


def cache_root() -> Path:
    """Where built artefacts live: $RLAIF_FORGE_HOME, else ~/.cache/rlaif-forge."""
    return Path(os.environ.get("RLAIF_FORGE_HOME", Path.home() / ".cache" / "rlaif-forge"))


def _spec_hash() -> str:
    blob = json.dumps({"spec": TINY_SPEC, "template": CHAT_TEMPLATE, "corpus": _CORPUS_EN + _CORPUS_ZH}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:12]


def build_tokenizer():
    """Byte-level BPE trained on a small built-in corpus (English + Chinese), wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TINY_SPEC["vocab_size"],
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_CORPUS_EN, _CORPUS_ZH] * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        additional_special_tokens=["<|im_start|>"],
        chat_template=CHAT_TEMPLATE,
        model_max_length=TINY_SPEC["max_position_embeddings"],
    )
    return fast


def build_tiny(path: Path) -> Path:
    """Build the tiny model + tokenizer into `path` (deterministic)."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=TINY_SPEC["hidden_size"],
        intermediate_size=TINY_SPEC["intermediate_size"],
        num_hidden_layers=TINY_SPEC["num_hidden_layers"],
        num_attention_heads=TINY_SPEC["num_attention_heads"],
        num_key_value_heads=TINY_SPEC["num_key_value_heads"],
        max_position_embeddings=TINY_SPEC["max_position_embeddings"],
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    with torch.random.fork_rng():  # building it (on first use, maybe mid-run) must not reseed the caller's RNG
        torch.manual_seed(TINY_SPEC["seed"])
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, do_sample=False
    )
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def tiny_model_path(root: Path | None = None) -> Path:
    """The cached tiny model folder, built on first use. Safe against concurrent builders: each builds
    into a temporary folder and renames it into place."""
    root = Path(root) if root is not None else cache_root()
    target = root / f"tiny-llama-{_spec_hash()}"
    if (target / "config.json").exists():
        return target
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tiny-build-", dir=root))
    try:
        build_tiny(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process won the race; its copy is identical
            pass
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model_path(name_or_path: str) -> str:
    """`builtin:tiny` -> the built folder; anything else unchanged (hub id or local path)."""
    if name_or_path.startswith(BUILTIN_PREFIX):
        which = name_or_path[len(BUILTIN_PREFIX) :]
        if which != "tiny":
            raise ValueError(f"unknown builtin model {name_or_path!r}; the only builtin is 'builtin:tiny'")
        return str(tiny_model_path())
    return name_or_path
