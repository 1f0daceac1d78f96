"""Layer 1: dataset preparation (annotation readers, shard writer, synthetic set, style stage)."""
