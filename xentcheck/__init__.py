"""xentcheck: where, and in which precision, does a cross-entropy loss stop telling the truth."""

__version__ = "0.1.0"
