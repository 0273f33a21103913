"""§4.1, §5: training loop, evaluation, checkpoints, distributed, precise BN."""
