"""Process topology: who am I (rank, world, device) under none | pytorch | slurm launchers."""
