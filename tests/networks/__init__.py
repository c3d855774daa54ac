"""Networks users train (a zoo shared with the scale benchmark), served end to end."""
