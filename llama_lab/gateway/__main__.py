"""``python -m llama_lab.gateway`` is ``llama-lab gateway``."""

import sys

from llama_lab.gateway.cli import main

raise SystemExit(main(sys.argv[1:]))
