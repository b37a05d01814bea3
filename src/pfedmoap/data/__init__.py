"""Data sets, federated partitions and the image-feature cache."""
