"""``python -m llama_lab`` is the ``llama-lab`` console script."""

from llama_lab.cli import main

raise SystemExit(main())
