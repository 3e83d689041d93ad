"""`evaluate` / `python -m synth.evaluate`: compose the Hydra config and hand it to synth.evaluate.app.run."""

import hydra

from synth.cli import guarded


@hydra.main(version_base=None, config_path="pkg://rlaif_forge_conf", config_name="evaluate")
def main(cfg) -> None:
    guarded(cfg, "synth.evaluate.app")


if __name__ == "__main__":
    main()
