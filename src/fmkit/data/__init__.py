"""Raw sources in, documents out (the start of the artifact line)."""
