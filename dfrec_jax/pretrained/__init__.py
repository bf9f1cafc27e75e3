"""Pretrained networks read offline from registry packages, and converters for user weights."""
