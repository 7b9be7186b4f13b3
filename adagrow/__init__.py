"""adagrow: grow, reparameterize, quantize and deploy PyTorch models."""
__version__ = "0.2.0"
