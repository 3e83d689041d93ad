"""`launcher=slurm`: an sbatch array over the unfinished shards plus a merge job that depends on it.

    synth <your overrides> launcher=slurm launcher.shards=64 launcher.concurrent=16 [launcher.submit=true]

writes `<output_dir>/slurm/{shards,merge}.sbatch` and `submit.sh`. Every array task runs the same
command with `shard=$SLURM_ARRAY_TASK_ID/64`; the merge job (`--dependency=afterany:<array>`) runs it
with `merge=true`, and refuses, naming them, if some shards did not finish. A requeued or retried task
resumes its shard from the ledger; two writers on one shard are refused by the folder lock (`flock`:
local disks and NFSv4/Lustre with locking enabled). Rendering again lists only the unfinished shards,
so resubmitting after failures reruns just those.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path
from typing import Any

from synth.errors import BackendError, ConfigError
from synth.launch import SlurmLauncher, unfinished


def synth_overrides() -> list[str]:
    """The command-line overrides of this `synth` call (from Hydra), launcher settings left out."""
    try:
        from hydra.core.hydra_config import HydraConfig

        task = list(HydraConfig.get().overrides.task)
    except (ImportError, ValueError):
        raise ConfigError("launcher=slurm renders the synth command line; run it from the `synth` command") from None
    return [o for o in task if not o.lstrip("+~").startswith(("launcher", "shard=", "merge="))]


def _array_spec(indices: list[int]) -> str:
    """[0,1,2,5,7,8] -> "0-2,5,7-8" (sbatch --array syntax)."""
    parts, start = [], None
    for k, i in enumerate(indices):
        if start is None:
            start = i
        if k + 1 == len(indices) or indices[k + 1] != i + 1:
            parts.append(f"{start}" if start == i else f"{start}-{i}")
            start = None
    return ",".join(parts)


def _header(lc: SlurmLauncher, name: str, log: str, gpus: int, cpus: int, mem: str, workdir: Path) -> list[str]:
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={name}",
        f"#SBATCH --output={log}",
        f"#SBATCH --chdir={workdir}",
        f"#SBATCH --time={lc.time}",
        f"#SBATCH --cpus-per-task={cpus}",
        f"#SBATCH --mem={mem}",
    ]
    if gpus:
        lines.append(f"#SBATCH --gpus-per-task={gpus}")
    if lc.partition:
        lines.append(f"#SBATCH --partition={lc.partition}")
    if lc.account:
        lines.append(f"#SBATCH --account={lc.account}")
    lines += [f"#SBATCH {opt}" for opt in lc.sbatch]
    return lines + ["set -euo pipefail", *lc.setup]


def render(lc: SlurmLauncher, overrides: list[str], todo: list[int], script_dir: Path, workdir: Path) -> dict[str, str]:
    """{file name: text} of the array script, the merge script and submit.sh (pure: writes nothing).
    Jobs start in `workdir` (where synth was called), so relative paths in `overrides` mean the same."""
    n = lc.shards
    cmd = " ".join([lc.command, *map(shlex.quote, overrides)])
    throttle = f"%{lc.concurrent}" if lc.concurrent else ""
    array = _header(
        lc,
        f"{lc.job_name}-shards",
        f"{script_dir}/logs/shard-%a.out",
        lc.gpus_per_task,
        lc.cpus_per_task,
        lc.mem,
        workdir,
    )
    array.insert(2, f"#SBATCH --array={_array_spec(todo)}{throttle}")
    array += [
        "# each task is an ordinary exact-once run; a requeue or a rerun resumes it from its ledger",
        f'{cmd} "shard=${{SLURM_ARRAY_TASK_ID}}/{n}" progress=false',
    ]
    merge = _header(lc, f"{lc.job_name}-merge", f"{script_dir}/logs/merge.out", 0, 1, "4G", workdir)
    merge += [
        "# refuses (exit 2, naming them) when some shards did not finish; no backend calls",
        f"{cmd} merge=true progress=false",
    ]
    submit = [
        "#!/bin/bash",
        "set -euo pipefail",
        'cd "$(dirname "$0")"',
        "mkdir -p logs",
        "array=$(sbatch --parsable shards.sbatch)",  # --parsable prints <job id>[;<cluster>]
        'merge=$(sbatch --parsable "--dependency=afterany:${array%%;*}" merge.sbatch)',
        'echo "${array%%;*} ${merge%%;*}"',
    ]
    return {
        "shards.sbatch": "\n".join(array) + "\n",
        "merge.sbatch": "\n".join(merge) + "\n",
        "submit.sh": "\n".join(submit) + "\n",
    }


def run_slurm(cfg, lc: SlurmLauncher, overrides: list[str] | None) -> dict[str, Any]:
    out_dir = Path(cfg.output_dir).expanduser().resolve()
    script_dir = Path(lc.script_dir).expanduser().resolve() if lc.script_dir else out_dir / "slurm"
    todo = unfinished(out_dir, lc.shards)
    files = (
        render(lc, synth_overrides() if overrides is None else overrides, todo, script_dir, Path.cwd()) if todo else {}
    )
    script_dir.mkdir(parents=True, exist_ok=True)
    (script_dir / "logs").mkdir(exist_ok=True)
    for name, text in files.items():
        (script_dir / name).write_text(text, encoding="utf-8")
    (script_dir / "submit.sh").chmod(0o755) if files else None
    if not todo:
        print(
            f"every shard of {lc.shards} has finished; merge with: synth ... merge=true output_dir={out_dir}",
            flush=True,
        )
        return {"status": "shards finished", "shards": lc.shards}
    if not lc.submit:
        for name in ("shards.sbatch", "merge.sbatch"):
            print(f"# ---- {script_dir / name}\n{files[name]}", flush=True)
        print(f"# {len(todo)} of {lc.shards} shards to run; submit with: bash {script_dir / 'submit.sh'}", flush=True)
        return {"status": "rendered", "script_dir": str(script_dir), "shards_to_run": todo}
    if shutil.which("sbatch") is None:
        raise BackendError(
            "launcher.submit=true but sbatch is not on PATH; run on a Slurm login node, or "
            "launcher.submit=false to write the scripts only"
        )
    jobs = subprocess.run(["bash", str(script_dir / "submit.sh")], capture_output=True, text=True, check=False)
    if jobs.returncode != 0:
        raise BackendError(
            f"sbatch failed: {jobs.stderr.strip().splitlines()[-1] if jobs.stderr.strip() else jobs.returncode}"
        )
    ids = jobs.stdout.split()
    if len(ids) != 2:
        raise BackendError(
            f"submit.sh printed {jobs.stdout.strip()!r}, not '<array job> <merge job>'; see {script_dir}"
        )
    print(f"submitted {len(todo)} shards as array job {ids[0]}, merge as job {ids[1]} (after the array)", flush=True)
    return {
        "status": "submitted",
        "jobs": {"array": ids[0], "merge": ids[1]},
        "script_dir": str(script_dir),
        "shards_to_run": todo,
    }
