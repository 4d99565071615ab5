"""Importance-aware integer codes (issue 23): the tokens attention picks out keep more bits."""
