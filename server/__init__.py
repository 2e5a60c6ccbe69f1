"""zkfs server: stores opaque ciphertext (metadata in sqlite, blobs on disk)."""
