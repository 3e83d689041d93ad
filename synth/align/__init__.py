"""`align`: iterative self-alignment rounds (recipes of synth / train / evaluate stages, in-process)."""
