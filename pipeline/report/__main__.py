"""`python -m pipeline.report`: the DVC stage entry point."""

from pipeline.common import run_main
from pipeline.report import main

run_main(main)
