"""Model family declarations (one file each) and the megatron-core model builder."""
