"""saekit's SAE side: the JumpReLU SAE, its objectives, the trainer, checkpoints and the CLI."""
