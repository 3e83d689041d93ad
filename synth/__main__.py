"""`synth` / `python -m synth`: compose the Hydra config and hand it to synth.app.run."""

import hydra

from synth.cli import guarded


@hydra.main(version_base=None, config_path="pkg://rlaif_forge_conf", config_name="synth")
def main(cfg) -> None:
    guarded(cfg, "synth.app")


if __name__ == "__main__":
    main()
