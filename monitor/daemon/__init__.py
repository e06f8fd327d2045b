"""The running daemon: watcher, pipeline stages, publisher and endpoints."""
