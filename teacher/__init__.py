"""The classifier-free-guidance teacher: shared UNet backbone, CFG training, two-pass guided prediction."""
