"""TFDS builders, forgery synthesis, face alignment and the host input pipeline."""
