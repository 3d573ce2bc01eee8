"""Process topology: who am I (rank, world, device) under each launcher of `env.LAUNCHERS`."""
