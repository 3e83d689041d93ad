"""train/models.py: gradient checkpointing is detected without the deprecated `is_gradient_checkpointing`."""

from __future__ import annotations

import warnings

from train.models import _checkpointing, load_policy


def test_checkpointing_flag_without_the_deprecated_property(tiny_path):
    plain = load_policy(str(tiny_path))
    on = load_policy(str(tiny_path), gradient_checkpointing=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)  # the deprecated property warns
        assert _checkpointing(on) and not _checkpointing(plain)
