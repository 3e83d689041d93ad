"""`train` / `python -m train`: compose the Hydra config and hand it to train.app.run."""

import hydra

from synth.cli import guarded


@hydra.main(version_base=None, config_path="pkg://rlaif_forge_conf", config_name="train")
def main(cfg) -> None:
    guarded(cfg, "train.app")


if __name__ == "__main__":
    main()
