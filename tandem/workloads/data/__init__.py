"""Data that ships with Tandem: a small generated text corpus for tests and the demo."""
