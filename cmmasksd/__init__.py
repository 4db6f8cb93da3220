"""cmmasksd: CRIS and CM-MaskSD for referring image segmentation; `train(config)` is the entry (`cmmasksd.train`)."""
