"""kdcore: the Distillery distillation engine.

Torch-free modules (importable by the API): `spec`, `architectures`, `errors`, `sniff`.
Everything else imports torch.
"""

__version__ = "0.1.0"
