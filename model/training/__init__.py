"""Training and evaluation (research code; the node never imports it): data, synthesis,
the training loop, validation, evaluation, ablation, noise-floor study, widening."""
