"""What every process of the service shares: settings, the wire format (event names, image links,
blob keys), images as bytes, logs and the compute budget. Torch-free."""
