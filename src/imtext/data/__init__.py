"""Data layer: the built-in ``shapes`` dataset, annotation readers, vocabulary, prepared splits."""
