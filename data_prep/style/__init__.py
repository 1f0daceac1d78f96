"""Style randomization network, sampling, weight import and the sharded stage."""
