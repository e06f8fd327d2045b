"""The model and everything that turns an image into masks and statistics."""
