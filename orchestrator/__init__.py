"""Driver side of odpo: config, the round loop, pools, streaming, weight sync, outputs, CLI."""
