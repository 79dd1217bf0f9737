"""The build cluster on Dask distributed: a scheduler keeping pools of workers, workers each
running builds with their own builder, and the client side used by the `cluster.build`
primitive (see `pipeline.cluster.protocol` for what they say to each other)."""
