"""The denoising network: building, checkpoints, inference, training, evaluation."""
