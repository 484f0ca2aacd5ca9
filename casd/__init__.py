"""casd: a content-addressed, deduplicating, resumable upload daemon."""

__version__ = "0.1.0"
