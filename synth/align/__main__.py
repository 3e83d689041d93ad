"""`align` / `python -m synth.align`: compose the Hydra config and hand it to synth.align.app.run."""

import hydra

from synth.cli import guarded


@hydra.main(version_base=None, config_path="pkg://rlaif_forge_conf", config_name="align")
def main(cfg) -> None:
    guarded(cfg, "synth.align.app")


if __name__ == "__main__":
    main()
