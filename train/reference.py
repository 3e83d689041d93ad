"""Reference-model pieces for the preference loops: precomputed reference log-probs (cached on disk),
TR-DPO reference updates, sDPO stages and Curry-DPO curriculum ordering (TR-DPO: Gorbatovski et al.
2024, arXiv 2404.09656; sDPO: Kim et al. 2024, arXiv 2403.19270; Curry-DPO: Pattnaik et al. 2024, arXiv 2403.07230).

Precomputed reference log-probs (one no-grad pass; training then holds one model)::

    ref = precompute_reference_logps(ref_model, tok_ds, kind="pairwise", pad_token_id=tok.pad_token_id,
                                     cache_dir=out_dir / "ref_cache", settings=report.settings)
    tok_ds = ref.attach(tok_ds)     # adds ref_* columns; data.PairCollator passes them through as [B] tensors

Columns / tensors by kind: pairwise ref_chosen_logps, ref_rejected_logps, ref_chosen_logps_mean,
ref_rejected_logps_mean; ranked ref_logps, ref_logps_mean (one value per response); unpaired ref_logps,
ref_logps_mean and, when the data has fixed KL pairs (`data.add_kl_completions`), ref_kl_logps.
The cache key hashes the model identity (name_or_path, revision, dtype, a fingerprint of the weights), the
token ids of every row (content, in order), the row kind and the caller's tokenisation settings. In a
distributed run call it under `accelerator.main_process_first()` so one process computes and the rest
read the file; compute the weight fingerprint before ZeRO-3/FSDP shards the parameters.

TR-DPO (arXiv 2404.09656), kept as two separate rules (TRL fuses them)::

    schedule = TRDPOSchedule(mode="soft", alpha=0.6)          # or mode="hard", tau=512
    ... after each optimizer step:
    if schedule.action(step) == "soft": soft_update(ref_model, policy, schedule.alpha)
    elif schedule.action(step) == "hard": hard_update(ref_model, policy)

With LoRA the reference is a second adapter ("reference") on the same base model: `add_reference_adapter`,
`soft_update_adapter` / `hard_update_adapter`, and `reference_adapter(model)` to run it. The hard update is
exact. The soft update mixes the LoRA factors A and B separately, and B A is bilinear, so the mixed
adapter is NOT alpha*dW_policy + (1-alpha)*dW_ref; it is the usual approximation when both adapters stay
close. For the exact soft rule use a full (non-LoRA) reference model. TR-DPO cannot use precomputed
reference log-probs: the reference changes.

sDPO (arXiv 2403.19270): `sdpo_stages(ds, T)` -> T ordered chunks; before stage t the reference becomes the current
policy (`hard_update`, or recompute the precomputed reference log-probs with the policy).
Curry-DPO (arXiv 2403.07230): `curry_pairs(scores)` orders one prompt's pairs, `curry_iterations(ranked_ds)` builds the
per-iteration pairwise datasets; each iteration's model is the next one's initialisation and reference.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import itertools
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import torch
from datasets import Dataset

from synth.io import fsync_dir, write_text_atomic
from train.data import RowKind, make_collator
from train.logprobs import concatenated_forward, listwise_forward, unpaired_forward

CACHE_VERSION = 1

# ------------------------------------------------------------------------------------------ fingerprints


def weights_fingerprint(model: torch.nn.Module, samples: int = 4096) -> str:
    """Hash of every parameter's name, shape and dtype plus up to `samples` evenly strided values of it.

    Cheap for any model size, and any training (full or LoRA) changes the sampled values of the tensors it
    touches. An edit of a handful of single weights can go unseen; pass an explicit identity then."""
    h = hashlib.sha256()
    for name, p in sorted(model.named_parameters(), key=lambda kv: kv[0]):
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // samples)
        h.update(f"{name}|{tuple(p.shape)}|{p.dtype}".encode())
        h.update(flat[::step].float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


def model_identity(
    model: torch.nn.Module, *, name_or_path: str | None = None, revision: str | None = None
) -> dict[str, Any]:
    """What identifies a reference model for the cache key."""
    config = getattr(model, "config", None)
    name = name_or_path or getattr(model, "name_or_path", None) or getattr(config, "_name_or_path", None)
    dtype = next(model.parameters()).dtype
    return {
        "name_or_path": str(name or type(model).__name__),
        "revision": revision or getattr(config, "_commit_hash", None),
        "dtype": str(dtype),
        "weights": weights_fingerprint(model),
    }


def _hash_arrow(h: hashlib._Hash, array: pa.Array) -> None:
    if pa.types.is_list(array.type) or pa.types.is_large_list(array.type):
        h.update(array.value_lengths().to_numpy(zero_copy_only=False).astype(np.int64).tobytes())
        _hash_arrow(h, array.flatten())
    else:
        h.update(array.to_numpy(zero_copy_only=False).astype(np.int64).tobytes())


def data_fingerprint(dataset: Dataset) -> str:
    """Content hash of the token columns (`*_ids`, `labels`, `label`), rows in dataset order."""
    columns = sorted(c for c in dataset.column_names if c.endswith("_ids") or c in ("labels", "label"))
    table = dataset.select_columns(columns).with_format("arrow")[:]  # honours select()/shuffle() indices
    h = hashlib.sha256(str(len(dataset)).encode())
    for name in columns:
        h.update(name.encode())
        _hash_arrow(h, table.column(name).combine_chunks())
    return h.hexdigest()[:16]


# ---------------------------------------------------------------------------- precomputed reference logps


@dataclass
class ReferenceLogps:
    """Reference log-probs for every row of a tokenised dataset, in dataset order."""

    tensors: dict[str, torch.Tensor]
    key: str
    path: Path
    from_cache: bool

    def attach(self, dataset: Dataset) -> Dataset:
        """The dataset with one ref_* column per tensor (ranked: a list per row, one value per response)."""
        n_resp = self.tensors.get("n_responses")
        for name, values in self.tensors.items():
            if name == "n_responses":
                continue
            if len(values) != len(dataset):
                raise ValueError(f"reference log-probs have {len(values)} rows, the dataset {len(dataset)}")
            column = (
                values.tolist()
                if n_resp is None
                else [v[:k] for v, k in zip(values.tolist(), n_resp.tolist(), strict=True)]
            )
            if name in dataset.column_names:  # sDPO / Curry: a new stage replaces the old reference
                dataset = dataset.remove_columns(name)
            dataset = dataset.add_column(name, column)
        return dataset


def precompute_reference_logps(
    model: torch.nn.Module,
    dataset: Dataset,
    *,
    kind: RowKind,
    pad_token_id: int | None,
    cache_dir: str | Path,
    batch_size: int = 8,
    settings: Mapping[str, Any] | None = None,
    identity: Mapping[str, Any] | None = None,
    show_progress: bool = True,
) -> ReferenceLogps:
    """Reference log-probs for a tokenised dataset: read from `cache_dir` when the key matches, else one
    batched no-grad pass (model in eval mode, restored after) written there (.safetensors + .json)."""
    parts = {
        "version": CACHE_VERSION,
        "kind": kind,
        "model": dict(identity or model_identity(model)),
        "data": data_fingerprint(dataset),
        "rows": len(dataset),
        "settings": dict(settings or {}),
    }
    key = hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:20]
    path = Path(cache_dir) / f"ref-logps-{key}.safetensors"
    if path.exists():
        from safetensors.torch import load_file

        return ReferenceLogps(load_file(str(path)), key, path, from_cache=True)
    tensors = _compute(model, dataset, kind, pad_token_id, batch_size, show_progress)
    _save(tensors, parts, path)
    return ReferenceLogps(tensors, key, path, from_cache=False)


def _reference_outputs(
    model: torch.nn.Module, kind: str, batch: dict[str, torch.Tensor], kl: bool
) -> dict[str, torch.Tensor]:
    if kind == "pairwise":
        out = concatenated_forward(model, batch)
        return {
            f"ref_{k}": out[k] for k in ("chosen_logps", "rejected_logps", "chosen_logps_mean", "rejected_logps_mean")
        }
    if kind == "ranked":
        out = listwise_forward(model, batch)
        return {"ref_logps": out["logps"], "ref_logps_mean": out["logps_mean"], "n_responses": out["mask"].sum(-1)}
    if kind == "unpaired":
        out = unpaired_forward(model, batch, kl=kl)
        keep = {"ref_logps": "logps", "ref_logps_mean": "logps_mean", "ref_kl_logps": "kl_logps"}
        return {k: out[v] for k, v in keep.items() if v in out}
    raise ValueError(f"reference log-probs are for preference data (pairwise, ranked, unpaired), not {kind!r}")


@torch.no_grad()
def _compute(
    model: torch.nn.Module, dataset: Dataset, kind: str, pad_token_id: int | None, batch_size: int, show_progress: bool
) -> dict[str, torch.Tensor]:
    from tqdm.auto import tqdm

    # Unpaired: KL pairs only when fixed in the data; rotating inside a batch would tie them to this pass.
    kl = kind == "unpaired" and "kl_completion_ids" in dataset.column_names
    collate = make_collator(kind, pad_token_id, **({"kl": kl} if kind == "unpaired" else {}))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()  # no dropout in the reference
    chunks: dict[str, list[torch.Tensor]] = {}
    try:
        for start in tqdm(range(0, len(dataset), batch_size), desc="Reference log-probs", disable=not show_progress):
            rows = dataset.select(range(start, min(start + batch_size, len(dataset))))
            batch = {k: v.to(device) for k, v in collate(list(rows)).items()}
            for name, value in _reference_outputs(model, kind, batch, kl).items():
                chunks.setdefault(name, []).append(value.float().cpu() if value.is_floating_point() else value.cpu())
    finally:
        model.train(was_training)
    if kind == "ranked":  # batches differ in Kmax: pad to the global one
        width = max(t.shape[1] for t in chunks["ref_logps"])
        for name in ("ref_logps", "ref_logps_mean"):
            chunks[name] = [torch.nn.functional.pad(t, (0, width - t.shape[1])) for t in chunks[name]]
    return {name: torch.cat(values) for name, values in chunks.items()}


def _save(tensors: dict[str, torch.Tensor], parts: Mapping[str, Any], path: Path) -> None:
    """Write beside a temporary name, fsync, rename and fsync the folder, so a reader never sees half a
    file and, after a power loss, the cache and its .json (written after it) are whole or absent."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp))
    with tmp.open("rb") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)
    write_text_atomic(path.with_suffix(".json"), json.dumps(parts, indent=2, sort_keys=True, default=str))


# ------------------------------------------------------------------------------------------------ TR-DPO


def _paired_parameters(ref: torch.nn.Module, policy: torch.nn.Module):
    ref_params, pol_params = dict(ref.named_parameters()), dict(policy.named_parameters())
    if ref_params.keys() != pol_params.keys():
        missing = sorted(ref_params.keys() ^ pol_params.keys())[:5]
        raise ValueError(f"reference and policy parameters differ (e.g. {missing})")
    return [(ref_params[n], pol_params[n]) for n in ref_params]


def _mix(pairs: Sequence[tuple[torch.Tensor, torch.Tensor]], alpha: float) -> None:
    """ref <- alpha * policy + (1 - alpha) * ref, in place, in the reference's dtype and device."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    with torch.no_grad():
        for ref, pol in pairs:
            ref.lerp_(pol.to(device=ref.device, dtype=ref.dtype), alpha)  # ref + alpha * (pol - ref)


def soft_update(ref: torch.nn.Module, policy: torch.nn.Module, alpha: float) -> None:
    """TR-DPO soft update in parameter space: theta_ref <- alpha * theta + (1 - alpha) * theta_ref."""
    _mix(_paired_parameters(ref, policy), alpha)


def hard_update(ref: torch.nn.Module, policy: torch.nn.Module) -> None:
    """TR-DPO hard update (and sDPO / Curry stage change): theta_ref <- theta."""
    with torch.no_grad():
        for r, p in _paired_parameters(ref, policy):
            r.copy_(p)


@dataclass(frozen=True)
class TRDPOSchedule:
    """When the loop updates the reference (`step` = optimizer steps completed, from 1).

    hard: copy every `tau` steps (paper: tau = 512). soft: mix with `alpha` every `soft_every` steps
    (paper: alpha = 0.6; every step by default). The soft cadence is not checked against
    arXiv 2404.09656; TRL's fused rule (mix with alpha every tau steps) is mode="soft", soft_every=tau."""

    mode: Literal["soft", "hard"]
    alpha: float = 0.6
    tau: int = 512
    soft_every: int = 1

    def __post_init__(self) -> None:
        if self.mode not in ("soft", "hard"):
            raise ValueError(f"TR-DPO mode must be soft or hard, got {self.mode!r}")
        if not 0.0 <= self.alpha <= 1.0 or self.tau < 1 or self.soft_every < 1:
            raise ValueError("TR-DPO needs 0 <= alpha <= 1, tau >= 1 and soft_every >= 1")

    def action(self, step: int) -> Literal["soft", "hard"] | None:
        every = self.tau if self.mode == "hard" else self.soft_every
        return self.mode if step > 0 and step % every == 0 else None

    def apply(self, step: int, ref: torch.nn.Module, policy: torch.nn.Module) -> Literal["soft", "hard"] | None:
        """Do what `action(step)` says on two plain modules; returns the action taken."""
        action = self.action(step)
        if action == "soft":
            soft_update(ref, policy, self.alpha)
        elif action == "hard":
            hard_update(ref, policy)
        return action


# ----------------------------------------------------------------------------------- LoRA reference adapter


def _adapter_pairs(model: torch.nn.Module, policy_adapter: str, ref_adapter: str):
    params = dict(model.named_parameters())
    src, dst = f".{policy_adapter}.", f".{ref_adapter}."
    names = [n for n in params if src in n]
    if not names or any(n.replace(src, dst) not in params for n in names):
        raise ValueError(
            f"model has no adapter pair {policy_adapter!r} -> {ref_adapter!r}; call add_reference_adapter(model) first"
        )
    return [(params[n.replace(src, dst)], params[n]) for n in names]


def add_reference_adapter(model: Any, name: str = "reference", policy_adapter: str = "default") -> None:
    """Add a frozen copy of the policy's LoRA adapter to a peft model, to serve as the TR-DPO reference."""
    model.add_adapter(name, copy.deepcopy(model.peft_config[policy_adapter]))
    hard_update_adapter(model, policy_adapter=policy_adapter, ref_adapter=name)
    for n, p in model.named_parameters():
        if f".{name}." in n:
            p.requires_grad_(False)


def soft_update_adapter(
    model: torch.nn.Module, alpha: float, policy_adapter: str = "default", ref_adapter: str = "reference"
) -> None:
    """Mix the LoRA factors (see the module docstring: approximate for the effective weights)."""
    _mix(_adapter_pairs(model, policy_adapter, ref_adapter), alpha)


def hard_update_adapter(
    model: torch.nn.Module, policy_adapter: str = "default", ref_adapter: str = "reference"
) -> None:
    with torch.no_grad():
        for ref, pol in _adapter_pairs(model, policy_adapter, ref_adapter):
            ref.copy_(pol)


@contextlib.contextmanager
def reference_adapter(model: Any, name: str = "reference") -> Iterator[Any]:
    """Run the model with the reference adapter active (frozen), then switch back to the policy's."""
    previous = model.active_adapter
    model.set_adapter(name, inference_mode=True)
    try:
        yield model
    finally:
        model.set_adapter(previous)


# ----------------------------------------------------------------------------------- sDPO and Curry-DPO


def sdpo_stages(dataset: Dataset, n_stages: int, difficulty: str | Sequence[float] | None = None) -> list[Dataset]:
    """Split into `n_stages` contiguous chunks, easy to hard (sizes differ by at most one row).

    `difficulty`: a column name or one value per row, lower = easier; rows are sorted by it (stably)
    first. Without it the dataset's own order is the curriculum (the paper orders by data source)."""
    if not 1 <= n_stages <= len(dataset):
        raise ValueError(f"n_stages must be in [1, {len(dataset)}], got {n_stages}")
    order = list(range(len(dataset)))
    if difficulty is not None:
        values = dataset[difficulty] if isinstance(difficulty, str) else list(difficulty)
        order.sort(key=lambda i: values[i])
    bounds = [round(s * len(order) / n_stages) for s in range(n_stages + 1)]
    return [dataset.select(order[a:b]) for a, b in itertools.pairwise(bounds)]


def curry_pairs(scores: Sequence[float]) -> list[tuple[int, int, float]]:
    """One prompt's Curry-DPO pairs (best, other, gap), easiest (largest gap) first; ties dropped.

    Scores (5, 4, 3, 2) -> [(0, 3, 3.0), (0, 2, 2.0), (0, 1, 1.0)]."""
    best = max(range(len(scores)), key=lambda i: scores[i])
    gaps = [(best, j, float(scores[best] - scores[j])) for j in range(len(scores)) if j != best]
    return sorted((p for p in gaps if p[2] > 0), key=lambda p: -p[2])


def curry_order(margins: Sequence[float]) -> list[int]:
    """Row indices of a pairwise dataset, largest score margin (easiest) first, stable for ties."""
    return sorted(range(len(margins)), key=lambda i: -margins[i])


def curry_iterations(ranked: Dataset) -> list[Dataset]:
    """Curry-DPO iterations from a canonical ranked dataset: iteration i holds, for every prompt, its i-th
    easiest pair (R_best, R_j) as a pairwise row (prompt, chosen, rejected, score_chosen, score_rejected)."""
    levels: list[list[dict[str, Any]]] = []
    for row in ranked:
        for level, (b, j, _) in enumerate(curry_pairs(row["scores"])):
            if level == len(levels):
                levels.append([])
            levels[level].append(
                {
                    "id": f"{row['id']}:{b}-{j}",
                    "prompt": row["prompt"],
                    "chosen": row["responses"][b],
                    "rejected": row["responses"][j],
                    "score_chosen": row["scores"][b],
                    "score_rejected": row["scores"][j],
                }
            )
    return [Dataset.from_list(rows) for rows in levels]
