"""rewriter: capture a pretrained transformer with torch.export, rewrite its attention and linear sites, verify, export."""
__version__ = "0.1.0"
