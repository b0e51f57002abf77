"""The blob store: image bytes and trajectories (a local directory or S3-compatible storage); Redis
keeps only references to them. Used by the API and the workers."""
