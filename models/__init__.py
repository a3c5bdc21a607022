"""Offline side of tower-recall: data sources, feature encoding, two-tower model, training,
evaluation against classic baselines, and bundle export."""
