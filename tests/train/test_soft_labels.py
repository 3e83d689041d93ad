"""loss=dpo on rows with p_chosen trains on the soft-label loss: the run says so (printed + summary)."""

from __future__ import annotations

from tests.train.loop_helpers import toy_pairs, train, write_records


def test_soft_labels_are_reported(tmp_path, capsys):
    rows = toy_pairs(8)
    for i, r in enumerate(rows):
        r.p_chosen = 0.8 if i % 2 else None
    data = write_records(tmp_path / "pairs.jsonl", rows)
    summary = train(tmp_path / "run", f"data.path={data}", "optim.max_steps=1", "optim.batch_size=4")
    assert summary["soft_labels"] == 4
    out = capsys.readouterr().out
    assert "4 of 8 pairs carry p_chosen" in out and "soft labels: 4 pairs" in out
    plain = train(
        tmp_path / "hard",
        f"data.path={write_records(tmp_path / 'hard.jsonl', toy_pairs(8))}",
        "optim.max_steps=1",
        "optim.batch_size=4",
    )
    assert "soft_labels" not in plain
