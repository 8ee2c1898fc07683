"""Sample data: the real CMU-1-Small-Region slide and synthetic slides built from it."""
