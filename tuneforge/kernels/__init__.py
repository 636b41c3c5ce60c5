"""Hand-written compute kernels shared by training and inference, each with a comment saying why no library does it."""
