"""Apache Beam adapter for modelshare (RunInference ModelHandler wrappers) -- not built yet."""
