"""The denoising network as the node runs it: building, checkpoints and their cards, inference,
the safety gate, noise. Training and evaluation are in model/training/."""
