"""Applications: the live consumer, the offline commands and the demo."""
