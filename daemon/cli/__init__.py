"""The `denoised-node` commands (click): main.py holds the group and the node's commands; the
model's, the rules' and doctor's are in modules of their own."""
