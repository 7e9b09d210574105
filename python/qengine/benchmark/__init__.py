"""Kernel microbenchmarks (`qengine bench`) and the timing harness the bench/ scripts share."""
