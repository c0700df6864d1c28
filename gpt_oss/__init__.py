"""gpt-oss (gpt-oss-20b, gpt-oss-120b): attention sinks, alternating sliding windows, biased clamped-GLU experts."""
from .family import GPT_OSS  # noqa: F401  (registers the family)
