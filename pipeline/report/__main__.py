"""`python -m pipeline.report`: the DVC stage entry point."""

from pipeline.report import main

raise SystemExit(main())
