"""Our preferences.jsonl is a TRL dataset as it is: `load_dataset("json", ...)` reads PreferenceRecord
rows and TRL's DPOTrainer trains on them (TRL is a test dependency only; nothing is downloaded)."""

from __future__ import annotations

import math

import pytest

from tests.train.loop_helpers import toy_pairs, write_records


def test_trl_dpo_trainer_reads_our_preferences_and_trains(tmp_path, tiny_path):
    trl = pytest.importorskip("trl")
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = write_records(tmp_path / "preferences.jsonl", toy_pairs(8))
    ds = load_dataset("json", data_files=str(path), split="train")
    assert {"prompt", "chosen", "rejected"} <= set(ds.column_names)
    assert ds[0]["prompt"][0]["role"] == "user" and ds[0]["chosen"][0]["role"] == "assistant"

    model = AutoModelForCausalLM.from_pretrained(tiny_path)
    tokenizer = AutoTokenizer.from_pretrained(tiny_path)
    args = trl.DPOConfig(
        output_dir=str(tmp_path / "trl"),
        max_steps=2,
        per_device_train_batch_size=2,
        learning_rate=1e-3,
        bf16=False,
        gradient_checkpointing=False,
        max_length=64,
        report_to=[],
        logging_steps=1,
        save_strategy="no",
        use_cpu=True,
        dataloader_num_workers=0,
    )
    trainer = trl.DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tokenizer)
    result = trainer.train()
    assert result.global_step == 2 and math.isfinite(result.training_loss)
