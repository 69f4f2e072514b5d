"""The volume's plumbing: where files live, how they are read and written, locks, waiting. Nothing else."""
