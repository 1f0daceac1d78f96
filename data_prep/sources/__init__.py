"""Annotation readers, one module per published format. Each yields :class:`~data_prep.sources.base.Record`."""
