"""Training data: load rows, tokenise them with the chat template, collate batches.

What a loop calls, top to bottom::

    ds = load_records(cfg.data.path)                  # canonical columns, below; DataError on bad rows
    kind = detect_kind(ds)                            # "sft" | "pairwise" | "ranked" | "unpaired"
    tok_ds, report = tokenize_dataset(ds, tokenizer, TokenizeConfig(max_length=1024, max_prompt_length=512))
    log.info(report.summary())                        # every truncation and drop, counted
    collate = make_collator(kind, pad_token_id=tokenizer.pad_token_id)
    batch = collate([tok_ds[i] for i in rows])        # rows: this step's ids from loops.common.epoch_batches

Accepted inputs (`load_records`): jsonl / json (optionally .gz), parquet, a `save_to_disk` folder, or a
hub dataset name. Row shapes: sft `messages`; pairwise `prompt`,`chosen`,`rejected` (+ optional `prompt_rejected`: the
rejected side's own instruction, a DOVE joint pair; accepted only by losses with `distinct_prompts`; synth's
joint rows `prompt_a`,`response_a`,`prompt_b`,`response_b`,`label` (a|b), `p_a` are read as such pairs)
(TRL conversational lists of {role, content}, TRL standard strings, or TRL's implicit prompt: no `prompt`, full
conversations in `chosen`/`rejected`); hh-rlhf texts "\\n\\nHuman: ...\\n\\nAssistant: ..." (the shared message prefix
becomes the prompt, the rest the completion); ranked `prompt`,`responses`,`scores`; D2O `prompt`,`samples`
(the model's own K responses), `rejected` (the human negative), read as a ranked list of K+1 (samples score 1,
the negative 0); unpaired
`prompt`,`completion`,`label`. Plain strings become one message (user for prompts, assistant otherwise).

Canonical columns (messages are lists of {"role", "content"}); every kind also has `id` (str):
    sft       messages
    pairwise  prompt, chosen, rejected (+ prompt_rejected, score_chosen, score_rejected, margin, p_chosen,
              reward_chosen, reward_rejected, cost_chosen, cost_rejected when present)
    ranked    prompt, responses (list of message lists), scores (list of float)
    unpaired  prompt, completion, label (bool)
Tokenised columns (`tokenize_dataset`; metadata columns are kept):
    sft       input_ids, labels (-100 outside the labelled assistant turns)
    pairwise  prompt_ids, chosen_ids, rejected_ids (+ rejected_prompt_ids: DOVE, the rejected side's prompt;
              with joint scoring each prompt is folded into its completion and prompt_ids is empty)
    ranked    prompt_ids, response_ids (list of lists)
    unpaired  prompt_ids, completion_ids (+ kl_completion_ids after `add_kl_completions`)
Batch keys (right padding; `labels` is -100 on prompt and padding; pad ids never matter):
    sft       input_ids, attention_mask, labels                                       [B, T]
    pairwise  input_ids, attention_mask, labels [2B, T]: rows 0..B-1 chosen, B..2B-1 rejected;
              optional [B, D] prompt_embeddings (rows with a `prompt_embedding` column, Relative PO);
              optional [B] floats: score_chosen, score_rejected, margin, p_chosen, reward_/cost_chosen/rejected,
              ref_chosen_logps, ref_rejected_logps, ref_chosen_logps_mean, ref_rejected_logps_mean
              (NaN where a row lacks it)
    ranked    input_ids, attention_mask, labels [sum(k), T]; list_index [B, Kmax] (row of each
              response in the flat batch, 0 where padded), list_mask [B, Kmax] bool, scores [B, Kmax];
              optional ref_logps, ref_logps_mean [B, Kmax]
    unpaired  input_ids, attention_mask, labels [B, T], label [B] bool; with kl=True also kl_input_ids,
              kl_attention_mask, kl_labels [B, T'] (prompt i with the completion of row i-1, so
              completion i meets prompt (i+1) mod B, as TRL does); optional ref_logps, ref_logps_mean,
              ref_kl_logps [B]

Completion tokens are found by prefix tokenisation (the tokenised prompt with the generation prompt must be a
prefix of the tokenised prompt+completion), so templates need no `{% generation %}` markers; the end-of-turn
tokens the template writes after the assistant message are labels. Fallbacks when the prefix property fails
are described at `tokenize.ChatEncoder.split` and counted in the `TokenisationReport`.

Modules: `load` (reading files, kind detection, hh-rlhf conversion, normalising to the canonical columns),
`tokenize` (chat-template tokenisation, truncation, the report) and `collate` (batches).
"""

from train.data.collate import (
    PAIR_REF,
    UNPAIRED_REF,
    PairCollator,
    RankedCollator,
    SFTCollator,
    UnpairedCollator,
    make_collator,
)
from train.data.load import (
    PAIR_SCALARS,
    DataError,
    RowKind,
    detect_kind,
    has_distinct_prompts,
    hh_to_messages,
    load_records,
    normalise_rows,
    read_rows,  # the raw rows with their extra columns (train/loops/reward.py reads safety labels so)
)
from train.data.tokenize import (
    IGNORE_INDEX,
    TokenisationReport,
    TokenizeConfig,
    add_kl_completions,
    require_chat_template,
    tokenize_dataset,
)

__all__ = [
    "IGNORE_INDEX",
    "PAIR_REF",
    "PAIR_SCALARS",
    "UNPAIRED_REF",
    "DataError",
    "PairCollator",
    "RankedCollator",
    "RowKind",
    "SFTCollator",
    "TokenisationReport",
    "TokenizeConfig",
    "UnpairedCollator",
    "read_rows",
    "add_kl_completions",
    "detect_kind",
    "has_distinct_prompts",
    "hh_to_messages",
    "load_records",
    "make_collator",
    "normalise_rows",
    "require_chat_template",
    "tokenize_dataset",
]
