"""Benchmarks run from the CLI (`sfgrpo bench ...`); the library never imports them."""
