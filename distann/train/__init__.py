"""Training: the first-pass sampler and distributed k-means."""
