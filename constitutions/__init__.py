"""Shipped constitutions (data only; installed as the package `rlaif_forge_constitutions`)."""
