"""Input pipelines: images and tabular data (image.py), text for language models (text.py)."""
