"""Files dvae writes and reads: the export directory, token sets and the official DALL·E weights (torch only)."""
