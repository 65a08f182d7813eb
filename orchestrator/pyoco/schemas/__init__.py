"""pyoco's configuration file model (``flow.yaml``)."""
