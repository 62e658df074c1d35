"""The Prefect task wrappers the flows call, and the plain decisions the flows make."""
