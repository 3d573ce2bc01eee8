"""Model side: loading, attention backend and document masking, summed loss."""
