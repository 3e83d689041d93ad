"""Hydra configs of rlaif-forge (data only; installed as the package `rlaif_forge_conf`)."""
