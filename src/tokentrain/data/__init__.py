"""Data layer: the InternLM format (format), the document table (index), line reads
(reader), samples (packing), rank splitting (sampler) and the batch contract (batch)."""
