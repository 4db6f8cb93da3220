"""DVC stages (one module each) and the Ray/MLflow glue that drives the `cmmasksd` library."""
