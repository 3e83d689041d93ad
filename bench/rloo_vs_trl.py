"""RLOO against TRL 1.16's RLOOTrainer: bench/grpo_vs_trl.py with --algo rloo (see its docstring).

python bench/rloo_vs_trl.py --repeats 3 --beta 0.05
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.grpo_vs_trl import main  # noqa: E402

if __name__ == "__main__":
    main(default_algo="rloo")
