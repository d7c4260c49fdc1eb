"""``python -m onnxprune`` is the ``onnxprune`` command."""

from onnxprune.cli import main

raise SystemExit(main())
