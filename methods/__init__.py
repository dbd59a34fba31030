"""Method plugins, one module per paper."""
