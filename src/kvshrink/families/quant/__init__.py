"""Integer codes in the KIVI layout (keys per channel, values per token), optionally rotated."""
